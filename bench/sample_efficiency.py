"""Tokens to a given loss: the AdamW GPT-2 baseline against the GPT-2.5 speedrun preset with Muon.

    nice -n 10 python bench/sample_efficiency.py            # the default scale (see --help), single core
    nice -n 10 python bench/sample_efficiency.py --json     # ... and one JSON object as the last line
    nice -n 10 python bench/sample_efficiency.py --ablation # the speedrun's model options one at a time

Corpus: the Python standard library's own source, every .py file of this interpreter's stdlib
outside test directories (12.6 MB with CPython 3.11), one document per file, byte-level tokens,
about 5% of the files held out for validation; converted once into data/stdlib-bytes/. A few
million tokens: the default budget reads a fraction of it once, so neither side sees repeats.

Both sides train the same model size on the same data in the same order for the same number of
tokens, through ZeRO-2 bf16 on one rank, each with a small learning-rate sweep:
  baseline  the `gpt2` preset at this size (LayerNorm, GELU, learned positions, tied head), AdamW
            with nanoGPT's hyperparameters: betas 0.9/0.95, weight decay 0.1, clip 1.0, warmup then
            cosine to lr/10.
  speedrun  the `gpt25-speedrun` preset at this size, Muon (momentum 0.95) on the blocks' matrices,
            AdamW (lr = muon lr / 8) on embeddings, head, norms; no clipping; warmup, constant, then
            linear decay to 0 over the last 30% (the modded-nanogpt schedule).
It prints each run's validation curve, the best run of each side, the tokens and the training wall
time (evaluation excluded) the best speedrun run needs to reach the best baseline's final validation
loss (where its curve crosses it, interpolated between evaluations), the ratios, a confirmation run of
the speedrun recipe on half the budget (its own schedule, so it decays in time) and training tokens/s
(evaluation excluded) of both sides.
`--ablation` instead trains GPT-2.5 + Muon with each model option added alone and all together.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO / "data" / "stdlib-bytes"
OPTIONS = ("qk_norm=true", "relu_squared=true", "tie_embeddings=false", "zero_init_proj=true", "logit_softcap=15")


# ---- corpus ------------------------------------------------------------------------------------------

def stdlib_corpus(out: Path = DATA) -> Path:
    """The stdlib's .py sources as byte-level shards (once; later calls reuse them)."""
    def sources():
        root = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(f for f in root.rglob("*.py")
                           if not {"site-packages", "test", "tests", "idle_test"} & set(f.relative_to(root).parts)):
            yield path.read_text(encoding="utf-8", errors="replace")

    return byte_shards(sources(), out)


def byte_shards(texts, out: Path) -> Path:
    """`texts` (an iterable of documents) as byte-level shards in `out`, made once: a directory that holds
    them already is returned as it is, and `texts` is not read."""
    from trainer.data.convert import convert

    if (out / "meta.json").is_file():
        return out
    jsonl = out.parent / f"{out.name}.jsonl"
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    with jsonl.open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    convert(str(jsonl), "bytes", out, workers=1, progress=False)
    jsonl.unlink()
    return out


# ---- one run -----------------------------------------------------------------------------------------

def size_args(args, gated: bool) -> list[str]:
    """The model size for both sides. The gated (SwiGLU-shaped) MLP gets 8/3 x n_embd hidden units (to a
    multiple of 32), GPT-2's MLP parameters and FLOPs, as the gpt25 presets have at 768 (2048 units);
    their rounding to 256 would give a small model 1.5x GPT-2's MLP."""
    sizes = ["--set", f"n_layer={args.n_layer}", "--set", f"n_embd={args.n_embd}", "--set", f"n_head={args.n_head}",
             "--set", f"block_size={args.seq_len}", "--seq-len", str(args.seq_len)]
    return sizes + (["--set", f"ffn_hidden={32 * round(8 * args.n_embd / 3 / 32)}"] if gated else [])


def baseline_args(lr: float) -> list[str]:
    return ["--model", "gpt2", "--ds-config", "zero2_bf16", "--lr", str(lr), "--min-lr", str(lr / 10),
            "--schedule", "cosine", "--weight-decay", "0.1", "--beta1", "0.9", "--beta2", "0.95", "--grad-clip", "1.0"]


def speedrun_args(muon_lr: float, model: str = "gpt25-speedrun") -> list[str]:
    return ["--model", model, "--ds-config", "zero2_muon_bf16", "--muon-lr", str(muon_lr), "--lr", str(muon_lr / 8),
            "--min-lr", "0", "--schedule", "wsd", "--weight-decay", "0.0", "--beta1", "0.9", "--beta2", "0.95",
            "--grad-clip", "0", "--muon-momentum", "0.95"]


def tokens_per_step(args) -> int:
    return args.micro_batch * args.grad_accum * args.seq_len  # one rank


def train(name: str, recipe: list[str], tokens: int, args, work: Path) -> dict:
    """One pretrain run in its own process; its validation curve (tokens, loss) and training tokens/s."""
    from trainer.plot import read_metrics, series

    out = work / name
    shutil.rmtree(out, ignore_errors=True)  # a rerun starts over (metrics.jsonl would otherwise append)
    per_step = tokens_per_step(args)
    steps = tokens // per_step
    yaml = work / f"{name}.yaml"
    yaml.parent.mkdir(parents=True, exist_ok=True)
    yaml.write_text("decay_frac: 0.3\n")  # the wsd schedule's decay window (read only by wsd)
    cmd = [sys.executable, "-m", "trainer.cli", "pretrain", "--config", str(yaml), "--data", str(args.data),
           "--out", str(out), "--resume", "never", *size_args(args, gated="gpt25" in recipe[1]), *recipe,
           "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum), "--max-steps", str(steps),
           "--warmup-steps", str(max(1, steps // 15)), "--eval-every", str(max(1, steps // args.evals)),
           "--eval-batches", str(args.eval_batches), "--save-every", "0", "--keep-last", "1",
           "--log-every", str(max(1, steps // 50)), "--seed", str(args.seed), "--no-tracking"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"run {name} failed:\n{proc.stderr[-3000:]}")
    records = read_metrics(out)
    train_records = [r for r in records if "loss" in r]
    curve = [(step * per_step, loss) for step, loss in zip(*series(records, "val_loss"))]
    clock = training_clock(train_records)
    result = {"name": name, "recipe": " ".join(recipe), "tokens": steps * per_step, "curve": curve,
              "seconds_curve": [(seconds_at(clock, tokens), loss) for tokens, loss in curve],
              "seconds": clock[-1][1], "final_val": curve[-1][1],
              # the first window holds the first step's one-time work (torch.compile of the Muon kernels)
              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_records[1:]),
              "params": _params(out)}
    print(f"  {name:<28} final val {result['final_val']:.4f}  {result['tokens_per_s']:>8,.0f} tokens/s  "
          f"curve {' '.join(f'{v:.3f}' for _, v in curve)}", flush=True)
    return result


def training_clock(train_records: list) -> list:
    """(tokens, training seconds so far) at every logged step: each record's window took its tokens over its
    tokens/s (evaluation and saves are not in the rate, so not in this clock)."""
    clock, tokens, seconds = [(0, 0.0)], 0, 0.0
    for record in train_records:
        seconds += (record["tokens"] - tokens) / record["tokens_per_s"]
        tokens = record["tokens"]
        clock.append((tokens, seconds))
    return clock


def seconds_at(clock: list, tokens: float) -> float:
    """Training seconds when `tokens` had been trained on, interpolated between logged steps."""
    for (t0, s0), (t1, s1) in zip(clock, clock[1:]):
        if t0 <= tokens <= t1:
            return s0 + (s1 - s0) * (tokens - t0) / max(t1 - t0, 1)
    return clock[-1][1]


def _params(run_dir: Path) -> int:
    import torch

    import models

    config = models.ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    with torch.device("meta"):
        return models.GPT(config).num_params()


def tokens_to_reach(curve: list, target: float):
    """First point where the curve is at or below target, interpolated linearly between evaluations."""
    previous = (0, float("inf"))
    for tokens, loss in curve:
        if loss <= target:
            t0, l0 = previous
            if l0 == float("inf"):
                return tokens
            return t0 + (tokens - t0) * (l0 - target) / (l0 - loss)
        previous = (tokens, loss)
    return None


# ---- the comparison ----------------------------------------------------------------------------------

def compare(args, work: Path) -> dict:
    print(f"baseline: gpt2 preset, AdamW, lr sweep {args.baseline_lrs}", flush=True)
    baseline = [train(f"baseline-lr{lr:g}", baseline_args(lr), args.tokens, args, work) for lr in args.baseline_lrs]
    print(f"speedrun: gpt25-speedrun preset, Muon, muon lr sweep {args.muon_lrs}", flush=True)
    speedrun = [train(f"speedrun-muon{lr:g}", speedrun_args(lr), args.tokens, args, work) for lr in args.muon_lrs]
    best_b = min(baseline, key=lambda r: r["final_val"])
    best_s = min(speedrun, key=lambda r: r["final_val"])
    target = best_b["final_val"]
    reach = tokens_to_reach(best_s["curve"], target)
    reach_seconds = tokens_to_reach(best_s["seconds_curve"], target)  # the same crossing, on the training clock
    muon_lr = args.muon_lrs[speedrun.index(best_s)]
    half = train(f"speedrun-muon{muon_lr:g}-half", speedrun_args(muon_lr), args.tokens // 2, args, work)
    result = {"corpus": "CPython stdlib .py sources, byte-level", "data": str(args.data),
              "model": f"{args.n_layer} x {args.n_embd}, {args.n_head} heads, seq {args.seq_len}",
              "tokens_per_step": tokens_per_step(args), "budget_tokens": args.tokens,
              "baseline": baseline, "speedrun": speedrun, "best_baseline": best_b["name"],
              "best_speedrun": best_s["name"], "target_val": target, "speedrun_tokens_to_target": reach,
              "ratio": reach / best_b["tokens"] if reach else None, "speedrun_seconds_to_target": reach_seconds,
              "baseline_seconds": best_b["seconds"],
              "time_ratio": reach_seconds / best_b["seconds"] if reach_seconds else None, "half_budget_run": half,
              "half_budget_reaches_target": half["final_val"] <= target,
              "tokens_per_s": {"baseline": best_b["tokens_per_s"], "speedrun": best_s["tokens_per_s"]}}
    print(f"\nbest baseline {best_b['name']}: final val {target:.4f} after {best_b['tokens']:,} tokens "
          f"({best_b['tokens_per_s']:,.0f} tokens/s, {best_b['params']:,} params)")
    print(f"best speedrun {best_s['name']}: final val {best_s['final_val']:.4f} after {best_s['tokens']:,} tokens "
          f"({best_s['tokens_per_s']:,.0f} tokens/s, {best_s['params']:,} params)")
    if reach:
        print(f"speedrun reaches the baseline's {target:.4f} after {reach:,.0f} tokens: "
              f"{result['ratio']:.2f}x the baseline's tokens; after {reach_seconds:,.0f} s of training against the "
              f"baseline's {best_b['seconds']:,.0f} s: {result['time_ratio']:.2f}x its wall time")
    else:
        print(f"speedrun does not reach the baseline's {target:.4f} within {args.tokens:,} tokens")
    print(f"speedrun on half the budget ({half['tokens']:,} tokens, its own schedule): final val "
          f"{half['final_val']:.4f} ({'reaches' if result['half_budget_reaches_target'] else 'misses'} {target:.4f})")
    return result


def ablation(args, work: Path) -> dict:
    """GPT-2.5 + Muon, then each option alone, then all of them; final val loss per seed."""
    variants = {"gpt25 + Muon": [], **{option: [option] for option in OPTIONS}, "all options": list(OPTIONS)}
    results = {}
    for seed in args.seeds:
        args.seed = seed
        for name, options in variants.items():
            sets = [a for option in options for a in ("--set", option)]
            run = train(f"ablation-{name.replace(' ', '').replace('+', '-')}-s{seed}",
                        [*speedrun_args(args.muon_lrs[len(args.muon_lrs) // 2], model="gpt25"), *sets],
                        args.tokens, args, work)
            results.setdefault(name, []).append(run["final_val"])
    base = statistics.mean(results["gpt25 + Muon"])
    print("\noption                     final val loss (mean over seeds)   vs gpt25 + Muon")
    for name, finals in results.items():
        print(f"{name:<26} {statistics.mean(finals):.4f}  ({', '.join(f'{f:.4f}' for f in finals)})"
              f"   {statistics.mean(finals) - base:+.4f}")
    return {"seeds": args.seeds, "final_val": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=2_457_600, help="training tokens per run (the budget)")
    parser.add_argument("--baseline-lrs", type=float, nargs="+", default=[1.5e-3, 3e-3, 6e-3, 1.2e-2])
    parser.add_argument("--muon-lrs", type=float, nargs="+", default=[0.01, 0.02, 0.04])
    parser.add_argument("--evals", type=int, default=12, help="validation evaluations per run")
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338], help="--ablation only")
    parser.add_argument("--ablation", action="store_true")
    parser.add_argument("--data", type=Path, default=None, help="dataset dir [default: the stdlib corpus]")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "sample_efficiency")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.data = args.data or stdlib_corpus()
    result = ablation(args, args.work) if args.ablation else compare(args, args.work)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
