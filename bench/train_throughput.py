"""Training throughput side by side with Hugging Face: tokens/s, FLOP/s, MFU, ours/HF.

    python bench/train_throughput.py --model gpt2-mini --seq-len 256 --micro-batch 8
    python bench/train_throughput.py --model gpt2 --seq-len 1024 --micro-batch 16 --ds-config zero2_bf16 --json
    deepspeed --num_gpus 2 bench/train_throughput.py --model gpt2-mini --seq-len 256 --micro-batch 4

Both models run in the same process through the same code: the DeepSpeed JSON given by --ds-config
merged by `trainer.engine.ds_config.build_ds_config`, `trainer.engine.build.initialize`, batches from
`trainer.data.shards.TrainStream` (a synthetic dataset of random tokens, or --data DIR), and the training
loop's idiom `engine(x, y)` -> `engine.backward` -> `engine.step`. "ours" is `models.GPT` with the
padded vocabulary the trainer uses, computing its loss itself (models/loss.py); "hf" is
`transformers.GPT2LMHeadModel` (or `LlamaForCausalLM` for GPT-2.5 presets) built from
`models.hf.hf_config(cfg)` behind an adapter that scores its logits with the same loss
(`models.loss.cross_entropy`, fp32 cross-entropy). Each model is timed over --steps optimizer steps after
--warmup steps, --repeats times; the best window counts (the machine may be shared, noise only ever
slows a window). On CPU both run with trainer/train/hostmem.py's malloc setting, as training does.

MFU = tokens/s x flops_per_token (PaLM formula, unpadded vocabulary, the same figure for both) over
the peak of all ranks: on GPU the datasheet table in trainer/train/metrics.py; on CPU a matmul peak of the
run's precision measured here, by every rank at once with its own threads (ranks share the cores).
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLS = ("ours", "hf")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2-mini", help="model preset (models.list_configs())")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--ds-config", default="zero2_bf16", help="a ds_configs name or path, or auto")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps per window")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    p.add_argument("--repeats", type=int, default=2, help="timed windows per model; the best counts")
    p.add_argument("--impl", default="ours,hf", help="which models: ours, hf or both (comma separated)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--profile", nargs="?", const="ops", choices=("ops", "shapes"), default=None,
                   help="after timing, print torch profiler's top ops of one step (--profile shapes: by input shape)")
    p.add_argument("--data", default=None, help="a dataset directory (default: synthetic random tokens)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher's
    args = p.parse_args(argv)
    args.impl = [s.strip() for s in args.impl.split(",") if s.strip()]
    bad = [s for s in args.impl if s not in IMPLS]
    if bad or not args.impl:
        p.error(f"--impl takes {' / '.join(IMPLS)}, got {args.impl}")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set takes KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    args.overrides = overrides
    return args


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


# ---- models ---------------------------------------------------------------------------------------

def model_config(args):
    import models

    cfg = models.get_config(args.model, **args.overrides)
    if args.seq_len > cfg.block_size:
        cfg = models.get_config(args.model, **{**args.overrides, "block_size": args.seq_len})
    if "padded_vocab_size" not in args.overrides:  # what trainer/train/pretrain.py does
        cfg.padded_vocab_size = models.padded_vocab_size(cfg.vocab_size)
    return cfg


class HFForward(torch.nn.Module):
    """A transformers causal LM behind our forward contract: (idx, targets) -> our loss of its logits."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model

    def forward(self, idx, targets):
        from models.loss import cross_entropy as lm_loss

        return lm_loss(self.hf(input_ids=idx, use_cache=False).logits, targets)


def build_model(impl: str, cfg, activation_checkpointing: bool):
    import models
    from models import hf

    torch.manual_seed(0)
    if impl == "ours":
        model = models.GPT(cfg)
        model.set_activation_checkpointing(activation_checkpointing)
        return model, type(model).__name__
    hf_cfg = hf.hf_config(cfg)
    cls = hf.hf_class(cfg)
    model = cls._from_config(hf_cfg, attn_implementation="sdpa")
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return HFForward(model), f"{cls.__name__} (attn {model.config._attn_implementation})"


# ---- data -----------------------------------------------------------------------------------------

def synthetic_dataset(vocab_size: int, tokens: int):
    """Random tokens in our shard format, written once by rank 0 (a directory per size under /tmp)."""
    import numpy as np

    from trainer import dist
    from trainer.data.shards import Dataset, write_shard

    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpt-trainer-bench-v{vocab_size}-n{tokens}"
    if dist.is_main() and not (root / "meta.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        shards = []
        for name, n in (("train_000000.bin", tokens), ("val_000000.bin", 4096)):
            shards.append({"name": name, **write_shard(root / name, rng.integers(0, vocab_size, n), vocab_size)})
        meta = {"tokenizer": "synthetic", "vocab_size": vocab_size, "eot_id": vocab_size - 1,
                "source": "bench/train_throughput.py random tokens", "shards": shards}
        tmp = root / f"meta.json.tmp{os.getpid()}"
        tmp.write_text(json.dumps(meta))
        tmp.replace(root / "meta.json")
    dist.barrier()
    return Dataset.open(root)


# ---- peak -----------------------------------------------------------------------------------------

def device_peak(dtype_name: str, device) -> tuple[float, str]:
    """Peak FLOP/s of all ranks together, and where the figure comes from."""
    from trainer import dist
    from trainer.train import metrics

    world = dist.world_size()
    if device.type == "cuda":
        per_rank, source = metrics.peak_flops(torch.bfloat16)
        return per_rank * world, f"{source} x {world}"
    dist.barrier()  # every rank measures at the same time: they share the cores, as in training
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    mine = torch.tensor([metrics.measure_matmul_tflops(dtype) * 1e12], dtype=torch.float64)
    if torch.distributed.is_initialized() and world > 1:
        torch.distributed.all_reduce(mine)
    return float(mine), (f"CPU {dtype_name} matmul measured in this run, {world} rank(s) x "
                         f"{torch.get_num_threads()} thread(s), best of mm layouts and F.linear")


# ---- timing ---------------------------------------------------------------------------------------

def run_impl(impl, cfg, args, ds_config, stream, grad_accum):
    from trainer import dist
    from trainer.engine import build as ds_engine
    from trainer.train.optim import param_groups

    rank, world = dist.rank(), dist.world_size()
    model, name = build_model(impl, cfg, args.activation_checkpointing)
    n_params = sum(p.numel() for p in model.parameters())
    engine = ds_engine.initialize(model, param_groups(model, 0.1), ds_config)
    if args.compile:
        ds_engine.compile_model(engine)
    device = engine.device
    cuda = device.type == "cuda"
    mb = args.micro_batch
    cursor = 0

    def step():  # the loop of trainer/train/loop.py, one optimizer step
        nonlocal cursor
        x, y = stream.local_batch(cursor, rank, world)
        for i in range(grad_accum):
            xb = x[i * mb:(i + 1) * mb].to(device, non_blocking=True)
            yb = y[i * mb:(i + 1) * mb].to(device, non_blocking=True)
            loss = engine(xb, yb)
            engine.backward(loss)
            engine.step()
        cursor += stream.global_batch
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    engine.train()
    for _ in range(args.warmup):
        loss = step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    windows = []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        elapsed = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
        if torch.distributed.is_initialized() and world > 1:  # the slowest rank sets the pace
            torch.distributed.all_reduce(elapsed, op=torch.distributed.ReduceOp.MAX)
        windows.append(float(elapsed))
    if args.profile and rank == 0:
        from torch.profiler import ProfilerActivity, profile

        by_shape = args.profile == "shapes"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities, record_shapes=by_shape) as prof:
            step()
            sync()
        sort = "cuda_time_total" if cuda else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=by_shape).table(sort_by=sort, row_limit=25)
        print(f"--- profile of one step: {impl} ---\n{table}", flush=True)
    result = {"model": name, "params": n_params, "step_s": min(windows) / args.steps,
              "window_s": windows, "final_loss": loss.item()}
    if cuda:
        result["memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    engine = model = None  # release the engine before the next model is built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main(argv=None):
    args = parse_args(argv)

    from trainer import dist
    from trainer.data.shards import Dataset, TrainStream
    from trainer.engine import build as ds_engine
    from trainer.engine.ds_config import build_ds_config, load_ds_config, resolve_ds_config_path, uses_muon, zero_stage
    from trainer.engine.ds_config import precision as ds_precision
    from trainer.errors import UserError
    from trainer.train import hostmem

    base = load_ds_config(args.ds_config)
    if uses_muon(base):
        raise UserError(f"{args.ds_config} uses Muon; this benchmark runs ours and Hugging Face's model through "
                        "the same AdamW config (Muon's groups are our blocks' matrices): pass an AdamW config. "
                        "bench/sample_efficiency.py reports Muon runs' tokens/s")
    ds_engine.init_distributed()
    hostmem.keep_freed_memory(ds_engine.device())  # as trainer/train/loop.py does
    world = dist.world_size()
    cfg = model_config(args)
    global_batch = args.micro_batch * args.grad_accum * world
    tokens_per_step = global_batch * args.seq_len
    if args.data:
        dataset = Dataset.open(args.data)
        if dataset.vocab_size != cfg.vocab_size:
            raise UserError(f"--data has vocab {dataset.vocab_size}, the model {cfg.vocab_size}; "
                            f"pass --set vocab_size={dataset.vocab_size}")
    else:
        needed = (args.warmup + args.steps * args.repeats + 1) * global_batch * (args.seq_len + 1)
        dataset = synthetic_dataset(cfg.vocab_size, max(needed, 1 << 20))
    stream = TrainStream(dataset, args.seq_len, global_batch, seed=0)
    ds_config = build_ds_config(
        base, micro_batch=args.micro_batch, grad_accum=args.grad_accum,
        world_size=world, grad_clip=1.0, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    precision = ds_precision(ds_config)
    device = ds_engine.device()

    # PaLM FLOPs of the unpadded model: the pad rows are our optimisation, not useful work.
    flops_per_token = _flops_per_token(cfg, args.seq_len)
    peak, peak_source = device_peak(precision, device)

    results = {}
    for impl in args.impl:
        r = run_impl(impl, cfg, args, ds_config, stream, args.grad_accum)
        r["tokens_per_s"] = tokens_per_step / r["step_s"]
        r["flops_per_s"] = r["tokens_per_s"] * flops_per_token
        r["mfu"] = r["flops_per_s"] / peak if peak else None
        results[impl] = r
    out = {
        "model": args.model, "overrides": args.overrides, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
        "n_head": cfg.n_head, "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size,
        "seq_len": args.seq_len, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "ranks": world,
        "tokens_per_step": tokens_per_step, "ds_config": str(resolve_ds_config_path(args.ds_config).name),
        "zero_stage": zero_stage(ds_config), "precision": precision,
        "activation_checkpointing": args.activation_checkpointing, "compile": args.compile,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "threads_per_rank": torch.get_num_threads(), "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "flops_per_token": flops_per_token, "peak_flops": peak, "peak_source": peak_source,
        "results": results,
    }
    if "ours" in results and "hf" in results:
        out["ratio_ours_hf"] = results["ours"]["tokens_per_s"] / results["hf"]["tokens_per_s"]
    if dist.is_main():
        print(format_table(out), flush=True)
        if args.json:
            print(json.dumps(out), flush=True)
    return out


def _flops_per_token(cfg, seq_len: int) -> float:
    """PaLM: 6N + 12 L H Q T, N = non-embedding params + the (unpadded) LM head matmul."""
    import dataclasses

    import models

    with torch.device("meta"):
        model = models.GPT(dataclasses.replace(cfg, padded_vocab_size=cfg.vocab_size))
    return float(model.flops_per_token(seq_len))


def format_table(out: dict) -> str:
    head = (f"{out['model']} ({out['n_layer']} x {out['n_embd']}, vocab {out['vocab_size']}) seq {out['seq_len']} "
            f"x micro-batch {out['micro_batch']} x grad-accum {out['grad_accum']} x {out['ranks']} rank(s) | "
            f"{out['ds_config']} (ZeRO-{out['zero_stage']} {out['precision']}) | "
            f"act-ckpt {'on' if out['activation_checkpointing'] else 'off'} | "
            f"compile {'on' if out['compile'] else 'off'} | {out['device']}\n"
            f"peak {out['peak_flops'] / 1e9:,.1f} GFLOP/s ({out['peak_source']}); "
            f"best of {out['repeats']} windows of {out['steps']} steps after {out['warmup']} warm-up")
    rows = [("impl", "model", "tokens/s", "step s", "GFLOP/s", "MFU", "memory GB")]
    for impl, r in out["results"].items():
        rows.append((impl, r["model"], f"{r['tokens_per_s']:,.0f}", f"{r['step_s']:.3f}",
                     f"{r['flops_per_s'] / 1e9:,.1f}", f"{r['mfu'] * 100:.1f}%" if r["mfu"] is not None else "-",
                     f"{r['memory_gb']:.2f}" if "memory_gb" in r else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [head] + ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    if "ratio_ours_hf" in out:
        lines.append(f"ours / hf: {out['ratio_ours_hf']:.2f}x tokens/s")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
