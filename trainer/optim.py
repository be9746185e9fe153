"""Optimizer parameter groups, the learning-rate schedule, and the hyperparameters in effect.

The trainer, not DeepSpeed, owns the learning rate: before every optimizer step it writes
`lr_at(step)` into the optimizer's groups (as nanoGPT does). The rate is therefore a pure function
of the step number and the run's current settings: a resumed run continues the schedule exactly,
a resume with another --lr / --max-steps / --schedule takes effect from that step, and a skipped
update (non-finite gradients) uses up its step of the schedule like any other, so the run always
ends at --min-lr. Betas, eps and weight decay are written back into the groups after every
checkpoint load (DeepSpeed restores the saved ones), so changed flags apply on resume too.
"""
import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY, NO_DECAY = "decay", "no_decay"


def param_groups(model, weight_decay: float) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or norm gains (GPT-2 / nanoGPT practice)."""
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.dim() >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": DECAY},
        {"params": no_decay, "weight_decay": 0.0, "name": NO_DECAY},
    ]


def group_names(groups: list[dict]) -> list[str]:
    return [g["name"] for g in groups]


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


def set_lr(optimizer, lr: float) -> None:
    """The rate of the coming optimizer step, in every group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def apply_hyperparameters(optimizer, names: list[str], *, betas: tuple, eps: float, weight_decay: float) -> None:
    """Write the run's betas, eps and weight decay into the optimizer's groups (the decay group gets
    `weight_decay`, the others 0). `names` are the groups' names in the order param_groups made them;
    DeepSpeed keeps that order (and drops nothing) in the groups of its own optimizers."""
    if len(optimizer.param_groups) != len(names):
        raise RuntimeError(f"optimizer has {len(optimizer.param_groups)} parameter groups, expected {len(names)}")
    for group, name in zip(optimizer.param_groups, names):
        group["betas"] = tuple(betas)
        group["eps"] = eps
        group["weight_decay"] = weight_decay if name == DECAY else 0.0


def hyperparameters_in_effect(optimizer, names: list[str]) -> dict:
    """{group name: {lr, betas, eps, weight_decay}} as the optimizer holds them right now."""
    return {name: {"lr": group["lr"], "betas": list(group["betas"]), "eps": group["eps"],
                   "weight_decay": group["weight_decay"]}
            for name, group in zip(names, optimizer.param_groups)}
