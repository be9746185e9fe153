"""bf16 training: accumulate gradients in bf16 or in fp32? Loss curves and tokens/s side by side.

    python bench/grad_accum_dtype.py                       # 300 steps, accumulation 8, seeds 1-3
    python bench/grad_accum_dtype.py --steps 500 --seeds 1 2 --json

Each seed trains the same model twice on the pydoc byte shards through ZeRO-2 bf16, once with the
config's `data_types.grad_accum_dtype` set to bf16 (DeepSpeed's default for a bf16 model) and once
to fp32 (what ds_configs/*_bf16.json ship), everything else equal. Prints the validation loss at each
evaluation and the mean training loss and tokens/s of both.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def train(data: Path, out: Path, accum_dtype: str, seed: int, steps: int, grad_accum: int) -> list[dict]:
    config = json.loads((REPO / "ds_configs" / "zero2_bf16.json").read_text())
    config["data_types"] = {"grad_accum_dtype": accum_dtype}
    ds_file = out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ds_file.write_text(json.dumps(config))
    args = [sys.executable, "-m", "trainer.cli", "pretrain", "--data", str(data), "--out", str(out), "--model", "tiny",
            "--set", "n_layer=4", "--set", "n_embd=128", "--set", "block_size=128", "--seq-len", "128",
            "--micro-batch", "4", "--grad-accum", str(grad_accum), "--lr", "3e-3", "--warmup-steps", "20",
            "--max-steps", str(steps), "--eval-every", "50", "--eval-batches", "20", "--save-every", "0",
            "--log-every", "1", "--seed", str(seed), "--ds-config", str(ds_file), "--no-tracking", "--keep-last", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(args, cwd=REPO, env=env, check=True, capture_output=True)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summarize(records: list[dict]) -> dict:
    train = [r for r in records if "loss" in r]
    return {"val": {r["step"]: r["val_loss"] for r in records if "val_loss" in r},
            "train_loss_last_half": statistics.mean(r["loss"] for r in train[len(train) // 2:]),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train[1:])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--grad-accum", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from trainer.data.convert import convert

    work = Path(tempfile.mkdtemp(prefix="grad-accum-"))
    data = work / "pydoc-bytes"
    convert("pydoc", "bytes", data, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    results = {}
    for seed in args.seeds:
        for dtype in ("bf16", "fp32"):
            results[f"{dtype} seed {seed}"] = summarize(train(data, work / f"{dtype}-{seed}", dtype, seed, args.steps,
                                                              args.grad_accum))
            r = results[f"{dtype} seed {seed}"]
            final = r["val"][max(r["val"])]
            print(f"seed {seed} {dtype} accumulation: final val {final:.4f}, train loss (last half) "
                  f"{r['train_loss_last_half']:.4f}, {r['tokens_per_s']:,.0f} tokens/s", flush=True)
    for dtype in ("bf16", "fp32"):
        finals = [r["val"][max(r["val"])] for k, r in results.items() if k.startswith(dtype)]
        speed = [r["tokens_per_s"] for k, r in results.items() if k.startswith(dtype)]
        print(f"{dtype} accumulation: final val loss mean {statistics.mean(finals):.4f} "
              f"(per seed {', '.join(f'{f:.4f}' for f in finals)}), tokens/s median {statistics.median(speed):,.0f}")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
