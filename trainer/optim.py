"""Optimizer parameter groups and the learning-rate schedule.

`lr_at(step, ...)` is a pure function so it can be unit-tested at its endpoints and handed to
DeepSpeed as a LambdaLR multiplier (DeepSpeed then checkpoints the scheduler's step with the run).
"""
import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or norm gains (GPT-2 / nanoGPT practice)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    Linear warmup from max_lr/warmup_steps to max_lr over `warmup_steps`, then:
    cosine / linear from max_lr down to min_lr at `total_steps`; constant stays at max_lr;
    wsd (warmup-stable-decay) holds max_lr and decays linearly to min_lr over the last
    `decay_frac` of the steps. Steps past `total_steps` stay at the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return max_lr
    if schedule == "wsd":
        decay_start = max(warmup_steps, total_steps - int(round(decay_frac * total_steps)))
        if step < decay_start:
            return max_lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return max_lr + (min_lr - max_lr) * progress
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max_lr + (min_lr - max_lr) * progress
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
