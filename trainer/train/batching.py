"""How one optimizer step's global batch is split over ranks and micro-batches, and how long a run is.

The global batch (sequences per optimizer step, all ranks) is what the data order and the optimizer
depend on; the micro-batch is only how much each rank computes at once. `--micro-batch auto` picks the
largest micro-batch the memory estimate (trainer/memory.py, with its margin) fits on the visible GPUs
and keeps the global batch by adjusting gradient accumulation.
"""
import math
from dataclasses import dataclass
from typing import Optional

from trainer.config import TrainConfig
from trainer.errors import UserError

CPU_MICRO_BATCH = 8  # --micro-batch auto without a GPU: no device memory to fill


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
    seq_len = _seq_len(cfg, block_size)
    per_step = cfg.micro_batch * world_size
    target = _global_batch_target(cfg, seq_len)
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


def total_steps(cfg: TrainConfig, plan: BatchPlan, stream) -> int:
    """The run length from --max-steps, --max-tokens or --epochs (the smallest wins); `stream` is the
    training stream (its samples_per_epoch)."""
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


def choose_micro_batch(cfg: TrainConfig, model_cfg, ds_config: dict, world_size: int,
                       gpu_memory_gb: Optional[float]) -> tuple[int, str]:
    """The micro-batch for `--micro-batch auto`, and the line that says how it was chosen.

    The largest that the memory estimate fits in `gpu_memory_gb` (the smallest visible GPU; None: no
    GPU) and that divides the per-rank share of the global batch, when the run fixes one."""
    if gpu_memory_gb is None:
        return CPU_MICRO_BATCH, f"micro-batch auto: no GPU, {CPU_MICRO_BATCH}"
    from trainer import memory

    seq_len = _seq_len(cfg, model_cfg.block_size)
    fit = memory.estimate(None, ds_config, model_cfg=model_cfg, gpus=world_size, micro_batch=1, seq_len=seq_len,
                          activation_checkpointing=cfg.activation_checkpointing,
                          gpu_memory_gb=gpu_memory_gb).max_micro_batch
    if fit < 1:
        raise UserError(f"--micro-batch auto: by the memory estimate not even one sequence of {seq_len} tokens fits in "
                        f"{gpu_memory_gb:.0f} GB per GPU with this DeepSpeed config; try --activation-checkpointing, "
                        "a ZeRO-3 or offload config, or more GPUs (estimate-memory shows the breakdown)")
    target = _global_batch_target(cfg, seq_len)
    if target is None:
        return fit, f"micro-batch auto: {fit}, the largest the memory estimate fits in {gpu_memory_gb:.0f} GB per GPU"
    if target % world_size:
        raise UserError(f"global batch of {target} sequences is not divisible by {world_size} ranks")
    per_rank = target // world_size
    micro = max(d for d in range(1, min(fit, per_rank) + 1) if per_rank % d == 0)
    return micro, (f"micro-batch auto: {micro} (the memory estimate fits {fit} in {gpu_memory_gb:.0f} GB per GPU; "
                   f"{micro} divides the global batch of {target} over {world_size} rank(s), grad-accum "
                   f"{per_rank // micro})")


def _seq_len(cfg: TrainConfig, block_size: int) -> int:
    seq_len = cfg.seq_len or block_size
    if seq_len > block_size:
        raise UserError(f"--seq-len {seq_len} is longer than the model's block_size {block_size}; "
                        f"lower --seq-len or pass --set block_size={seq_len}")
    return seq_len


def _global_batch_target(cfg: TrainConfig, seq_len: int) -> Optional[int]:
    """Sequences per optimizer step the run fixes (--global-batch, or --global-batch-tokens), or None."""
    if cfg.global_batch_tokens is not None:
        if cfg.global_batch_tokens % seq_len:
            raise UserError(f"--global-batch-tokens {cfg.global_batch_tokens} is not a multiple of --seq-len {seq_len}")
        return cfg.global_batch_tokens // seq_len
    return cfg.global_batch
