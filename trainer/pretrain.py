"""The pretraining loop: data, model and DeepSpeed engine in, checkpoints and metrics out.

The loop follows DeepSpeed's idiom (STYLE.md, convention 8): for each micro-batch `engine(x, y)`
(the model's own loss, models/loss.py, the one eval-ppl scores), `engine.backward`, `engine.step`; DeepSpeed scales for accumulation and steps
the optimizer and the LR schedule on accumulation boundaries, where we also log, evaluate and
save. A step whose gradients are not finite is skipped by DeepSpeed on every rank (bf16/fp16
overflow check); we count it and stop after `max_skips` in a row.

Data order is a pure function of (seed, dataset, seq_len, global batch, cursor), so resuming
from a checkpoint's cursor continues with exactly the batches an uninterrupted run would see.
"""
import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from tqdm import tqdm

import models
from trainer import checkpoint, dist, engine as ds_engine, hostmem, recovery
from trainer.config import TrainConfig, parse_duration, save_yaml
from trainer.data import Dataset, TrainStream, ValStream
from trainer.errors import UserError
from trainer.metrics import MetricsWriter, memory_gb, peak_flops
from trainer.optim import lr_at, param_groups


@dataclass
class BatchPlan:
    """How one optimizer step's global batch is split over ranks and micro-batches."""
    seq_len: int
    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def plan_batches(cfg: TrainConfig, block_size: int, world_size: int) -> BatchPlan:
    seq_len = cfg.seq_len or block_size
    if seq_len > block_size:
        raise UserError(f"--seq-len {seq_len} is longer than the model's block_size {block_size}; "
                        f"lower --seq-len or pass --set block_size={seq_len}")
    per_step = cfg.micro_batch * world_size
    target = cfg.global_batch
    if cfg.global_batch_tokens is not None:
        if cfg.global_batch_tokens % seq_len:
            raise UserError(f"--global-batch-tokens {cfg.global_batch_tokens} is not a multiple of --seq-len {seq_len}")
        target = cfg.global_batch_tokens // seq_len
    if target is not None:
        if target % per_step:
            raise UserError(f"global batch of {target} sequences is not divisible by ranks x micro-batch = "
                            f"{world_size} x {cfg.micro_batch} = {per_step}; change --micro-batch or the global batch")
        accum = target // per_step
        if cfg.grad_accum is not None and cfg.grad_accum != accum:
            raise UserError(f"--grad-accum {cfg.grad_accum} contradicts the global batch ({target} sequences = "
                            f"{world_size} ranks x {cfg.micro_batch} micro-batch x {accum}); give only one of them")
    else:
        accum = cfg.grad_accum or 1
    return BatchPlan(seq_len=seq_len, micro_batch=cfg.micro_batch, grad_accum=accum, world_size=world_size)


def total_steps(cfg: TrainConfig, plan: BatchPlan, stream: TrainStream) -> int:
    """The run length from --max-steps, --max-tokens or --epochs (the smallest wins)."""
    limits = []
    if cfg.max_steps is not None:
        limits.append(cfg.max_steps)
    if cfg.max_tokens is not None:
        limits.append(math.ceil(cfg.max_tokens / plan.tokens_per_step))
    if cfg.epochs is not None:
        limits.append(math.ceil(cfg.epochs * stream.samples_per_epoch / plan.global_batch))
    if not limits:
        limits.append(math.ceil(stream.samples_per_epoch / plan.global_batch))  # one epoch
    return max(1, min(limits))


def open_dataset(cfg: TrainConfig) -> Dataset:
    if cfg.data is None:
        from trainer.convert import ensure_demo_data

        tokenizer = cfg.tokenizer or "bytes"
        target = Path("data") / f"pydoc-{tokenizer.replace(':', '_').replace('/', '_')}"
        if dist.is_main():
            ensure_demo_data(target, tokenizer=tokenizer)
        dist.barrier()
        cfg.data = str(target)
    elif cfg.tokenizer is not None:
        raise UserError("--tokenizer is only for the built-in demo data; with --data the tokenizer recorded in "
                        "the dataset's meta.json is used (convert your text with tools/convert_shards.py)")
    return Dataset.open(cfg.data)


def build_model_config(cfg: TrainConfig, dataset: Dataset) -> "models.ModelConfig":
    overrides = dict(cfg.model_overrides)
    if "vocab_size" in overrides and overrides["vocab_size"] != dataset.vocab_size:
        raise UserError(f"--set vocab_size={overrides['vocab_size']} does not match the dataset's tokenizer "
                        f"({dataset.tokenizer_spec}, vocab {dataset.vocab_size}); drop the override")
    overrides["vocab_size"] = dataset.vocab_size
    if "padded_vocab_size" not in overrides:
        # Round the embedding / head rows up to a multiple of 64 for fast matmuls (50257 -> 50304);
        # the pad logits are never returned, so never sampled or scored.
        overrides["padded_vocab_size"] = ((dataset.vocab_size + 63) // 64) * 64
    try:
        return models.get_config(cfg.model, **overrides)
    except (ValueError, TypeError) as e:
        raise UserError(str(e))


class StopFlag:
    """SIGTERM / SIGINT ask the loop to save and exit at the next step boundary."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def evaluate(engine, val: ValStream, n_batches: int, device) -> float:
    """Mean validation loss over the fixed validation batches (token-weighted, all ranks)."""
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, y in val.batches(n_batches, dist.rank(), dist.world_size()):
            x, y = x.to(device), y.to(device)
            total[0] += engine(x, y, reduction="sum").double()
            total[1] += y.numel()
    engine.train()
    if torch.distributed.is_initialized() and dist.world_size() > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1].clamp(min=1)).item()


def run(cfg: TrainConfig, json_output: bool = False) -> dict:
    ds_engine.init_distributed()
    rank, world = dist.rank(), dist.world_size()
    hostmem.keep_freed_memory(ds_engine.device())
    run_dir = Path(cfg.out)
    dataset = open_dataset(cfg)
    model_cfg = build_model_config(cfg, dataset)
    plan = plan_batches(cfg, model_cfg.block_size, world)
    stream = TrainStream(dataset, plan.seq_len, plan.global_batch, cfg.seed)
    val = ValStream(dataset, plan.seq_len, plan.micro_batch)
    steps = total_steps(cfg, plan, stream)
    deadline = time.time() + parse_duration(cfg.max_time) if cfg.max_time else None

    ds_base = ds_engine.load_ds_config(cfg.ds_config)
    ds_config = ds_engine.build_ds_config(
        ds_base, micro_batch=plan.micro_batch, grad_accum=plan.grad_accum, world_size=world,
        grad_clip=cfg.grad_clip, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)

    torch.manual_seed(cfg.seed)
    model = models.GPT(model_cfg)
    if cfg.init_from:
        from trainer.modelio import load_weights_into

        load_weights_into(model, cfg.init_from)
    model.set_activation_checkpointing(cfg.activation_checkpointing)

    def lr_lambda(step: int) -> float:
        return lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=steps,
                     schedule=cfg.schedule, decay_frac=cfg.decay_frac) / cfg.lr

    # The resume decision comes before the engine: another rank count / ZeRO setup loads a universal copy.
    resume_from = recovery.find_resume(run_dir, cfg.resume)  # skips (and names) damaged checkpoints
    if resume_from is not None:
        checkpoint.check_model(resume_from, dataclasses.asdict(model_cfg))
        load_path, ds_config = checkpoint.prepare_resume(resume_from, world, ds_config, plan.global_batch)
    engine, _, scheduler = ds_engine.initialize(model, param_groups(model, cfg.weight_decay), ds_config, lr_lambda)
    device = engine.device
    if cfg.compile:
        ds_engine.compile_model(engine)

    state = {"step": 0, "cursor": 0, "tokens": 0, "skipped_total": 0}
    client = checkpoint.load(engine, resume_from, load_path) if resume_from is not None else {}
    state.update({k: client[k] for k in state if k in client})
    steps_at_start = state["step"]  # --stop-after-steps counts from here
    if resume_from is not None:
        dist.print0(f"resumed from {resume_from} at step {state['step']} ({state['tokens']:,} tokens seen)")
    elif cfg.resume == "auto" and checkpoint.checkpoints_dir(run_dir).is_dir() and any(
            checkpoint.checkpoints_dir(run_dir).glob("step_*")):
        dist.print0(f"note: {checkpoint.checkpoints_dir(run_dir)} holds no complete checkpoint; starting fresh")

    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(dataclasses.replace(cfg, seq_len=plan.seq_len, grad_accum=plan.grad_accum, max_steps=steps),
                  run_dir / "config.yaml")
        (run_dir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2))
    # --no-tracking turns off TensorBoard and W&B; metrics.jsonl is part of the run directory and stays.
    writer = MetricsWriter(run_dir, enabled=dist.is_main(), tensorboard=cfg.tracking,
                           wandb_project=cfg.wandb_project if cfg.tracking else None, config=cfg.to_dict())
    flops_per_token = model.flops_per_token(plan.seq_len)
    peak, peak_source = peak_flops(torch.bfloat16 if ds_engine.precision(ds_config) == "bf16" else torch.float32) \
        if dist.is_main() else (0.0, "")
    dist.print0(f"model {cfg.model}: {model.num_params():,} parameters | data {dataset.path} "
                f"({dataset.train_tokens:,} train tokens, tokenizer {dataset.tokenizer_spec})")
    dist.print0(f"{world} rank(s) x micro-batch {plan.micro_batch} x grad-accum {plan.grad_accum} = "
                f"{plan.global_batch} sequences of {plan.seq_len} ({plan.tokens_per_step:,} tokens) per step | "
                f"ZeRO-{ds_engine.zero_stage(ds_config)} {ds_engine.precision(ds_config)} "
                f"({ds_engine.resolve_ds_config_path(cfg.ds_config).name}) | {steps} steps | MFU vs {peak_source}")

    def client_state() -> dict:
        return {**state, "train_config": cfg.to_dict(), "model_config": dataclasses.asdict(model_cfg),
                "tokenizer": dataset.tokenizer_spec, "world_size": world,
                "zero_stage": ds_engine.zero_stage(ds_config), "global_batch": plan.global_batch,
                "seq_len": plan.seq_len}

    # --max-time stops early enough for one more step and a save: the longest of each seen so far.
    slowest = {"step": 0.0, "save": 0.0}

    def save() -> Path:
        started = time.perf_counter()
        path = recovery.save(engine, run_dir, state["step"], client_state(), keep_last=cfg.keep_last)
        slowest["save"] = max(slowest["save"], time.perf_counter() - started)
        return path

    stop = StopFlag()
    consecutive_skips = 0
    last_loss = last_val = None
    stop_reason = "finished"
    log_loss = torch.zeros((), device=device)
    log_steps, log_t0, log_tokens0 = 0, time.perf_counter(), state["tokens"]
    bar = tqdm(total=steps, initial=state["step"], disable=not dist.is_main(), dynamic_ncols=True,
               desc="pretrain", unit="step")
    try:  # any error below (a failed save, a rollback that gives up) leaves the bar closed, so `Error:` starts a line
        engine.train()
        while state["step"] < steps:
            step_started = time.perf_counter()
            x, y = stream.local_batch(state["cursor"], rank, world)
            step_lr = scheduler.get_last_lr()[0]  # the rate this step's update uses (the scheduler moves on after it)
            step_loss = torch.zeros((), device=device)
            skipped_before = engine.skipped_steps
            for i in range(plan.grad_accum):
                xb = x[i * plan.micro_batch:(i + 1) * plan.micro_batch].to(device, non_blocking=True)
                yb = y[i * plan.micro_batch:(i + 1) * plan.micro_batch].to(device, non_blocking=True)
                loss = engine(xb, yb)  # the model's own loss: no B x T x V fp32 logits (models/loss.py)
                engine.backward(loss)
                engine.step()
                step_loss += loss.detach()
            state["step"] += 1
            state["cursor"] += plan.global_batch
            state["tokens"] += plan.tokens_per_step
            skipped = engine.skipped_steps - skipped_before
            state["skipped_total"] += skipped
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            log_loss += step_loss / plan.grad_accum
            log_steps += 1
            bar.update(1)

            is_last = state["step"] >= steps
            if state["step"] % cfg.log_every == 0 or is_last or skipped:
                mean_loss = ds_engine.all_reduce_mean(log_loss / log_steps).item()
                elapsed = time.perf_counter() - log_t0
                tokens_per_s = (state["tokens"] - log_tokens0) / max(elapsed, 1e-9)
                mfu = tokens_per_s * flops_per_token / (peak * world) if peak else None
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else None
                record = {"step": state["step"], "loss": mean_loss, "lr": step_lr,
                          "grad_norm": grad_norm, "tokens": state["tokens"], "tokens_per_s": tokens_per_s,
                          "mfu": mfu, "skipped": state["skipped_total"]}
                mem = memory_gb()
                if mem is not None:
                    record["memory_gb"] = mem
                writer.log(record)
                last_loss = mean_loss
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{record['lr']:.2e}",
                                gn=f"{grad_norm:.2f}" if grad_norm is not None and math.isfinite(grad_norm) else "nan",
                                tok_s=f"{tokens_per_s:,.0f}", mfu=f"{mfu * 100:.1f}%" if mfu is not None else "-")
                log_loss.zero_()
                log_steps, log_t0, log_tokens0 = 0, time.perf_counter(), state["tokens"]
            if skipped:
                dist.print0(f"step {state['step']}: non-finite gradients, update skipped on all ranks "
                            f"({consecutive_skips} in a row, {state['skipped_total']} in total)")
                if consecutive_skips >= cfg.max_skips:
                    # back to the last good checkpoint, past the offending data; or stop (trainer/recovery.py)
                    recovery.roll_back(engine, run_dir, state, cfg, consecutive_skips)
                    consecutive_skips = 0
                    bar.n = state["step"]
                    continue  # no eval or save of the step just restored

            if cfg.eval_every and (state["step"] % cfg.eval_every == 0 or is_last):
                last_val = evaluate(engine, val, cfg.eval_batches, device)
                writer.log({"step": state["step"], "val_loss": last_val})
                if dist.is_main():
                    bar.write(f"step {state['step']}: val_loss {last_val:.4f}")
            if cfg.hellaswag_every:  # periodic HellaSwag, logged like val loss (trainer/periodic.py)
                from trainer.periodic import maybe_hellaswag

                maybe_hellaswag(engine, cfg, state["step"], dataset.tokenizer_spec, writer, last=is_last)

            slowest["step"] = max(slowest["step"], time.perf_counter() - step_started)
            margin = slowest["step"] + slowest["save"]
            wants_stop = _agree_to_stop(stop, deadline - margin if deadline else None, device) or (  # a pause: same schedule, resume later
                cfg.stop_after_steps and state["step"] - steps_at_start >= cfg.stop_after_steps and "--stop-after-steps")
            if wants_stop and not is_last:
                stop_reason = wants_stop
                save()
                break
            if (cfg.save_every and state["step"] % cfg.save_every == 0) or is_last:
                save()
    finally:
        bar.close()
        writer.close()

    result = {"run_dir": str(run_dir), "step": state["step"], "tokens": state["tokens"], "loss": last_loss,
              "val_loss": last_val, "skipped": state["skipped_total"], "stopped": stop_reason}
    if dist.is_main():
        _print_summary(result, run_dir, stop_reason)
        if json_output:
            print(json.dumps(result))
    return result


def _agree_to_stop(stop: StopFlag, deadline: Optional[float], device) -> Optional[str]:
    """All ranks must stop at the same step, so a signal or time limit on any rank is shared."""
    flags = torch.tensor([stop.signal is not None, deadline is not None and time.time() >= deadline],
                         dtype=torch.float32, device=device)
    flags = ds_engine.all_reduce_max(flags)
    if flags[0] > 0:
        return f"signal {stop.signal or 'on another rank'}"
    if flags[1] > 0:
        return "max-time reached"
    return None


def _print_summary(result: dict, run_dir: Path, stop_reason: str) -> None:
    val = f", val loss {result['val_loss']:.4f}" if result["val_loss"] is not None else ""
    loss = f"{result['loss']:.4f}" if result["loss"] is not None else "n/a"
    print(f"\n{stop_reason} at step {result['step']} ({result['tokens']:,} tokens): loss {loss}{val}")
    print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, tb/, checkpoints/)")
    print("next:")
    print(f"  python -m trainer.cli eval-ppl --model-path {run_dir}")
    print(f"  python -m trainer.cli generate --model-path {run_dir} --prompt 'The '")
    print(f"  python tools/zero_to_fp32.py {run_dir} {run_dir}/hf --hf")
    print(f"  tensorboard --logdir {run_dir}/tb")
