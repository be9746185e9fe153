"""Optimizer parameter groups, the learning-rate schedule, and the hyperparameters in effect.

The trainer, not DeepSpeed, owns the learning rate: before every optimizer step it writes
`lr_at(step)` into the optimizer's groups (as nanoGPT does). The rate is therefore a pure function
of the step number and the run's current settings: a resumed run continues the schedule exactly,
a resume with another --lr / --max-steps / --schedule takes effect from that step, and a skipped
update (non-finite gradients) uses up its step of the schedule like any other, so the run always
ends at --min-lr. Betas, eps and weight decay are written back into the groups after every
checkpoint load (DeepSpeed restores the saved ones), so changed flags apply on resume too.

With DeepSpeed's Muon (a ds_configs JSON with `"type": "Muon"`) the hidden matrices of the blocks
form their own group, named `muon`; the embeddings, the head, norms and biases stay on AdamW. The
Muon group's rate is `lr_at(step)` scaled by muon_lr / lr, so both halves share the schedule's shape
and both rates stay pure functions of the step and the flags.
"""
import math

SCHEDULES = ("cosine", "linear", "constant", "wsd")
DECAY, NO_DECAY, MUON = "decay", "no_decay", "muon"


def muon_params(model) -> list:
    """The parameters Muon updates: the 2-D weights inside the transformer blocks (attention and MLP
    matrices). Embeddings and the head are not hidden matrices (their rows are per-token lookups; an
    orthogonalized update would move rows of tokens the batch never saw), and norms and biases are not
    matrices: those stay on AdamW, as in modded-nanogpt."""
    return [p for p in model.blocks.parameters() if p.dim() == 2 and p.requires_grad]


def param_groups(model, weight_decay: float, muon: bool = False, muon_weight_decay: float = 0.0) -> list[dict]:
    """Decay 2-D weights (matmuls, embeddings); never biases or norm gains (GPT-2 / nanoGPT practice).

    muon=True puts `muon_params(model)` first, in a group of their own with `muon_weight_decay`,
    ordered by size, largest first: DeepSpeed's Muon sorts its group that way (a stable sort), so
    handing it over sorted keeps the flat buffers in exactly this order (ZeRO-0 consolidation reads
    them by it). Empty groups are left out (DeepSpeed's Muon drops them)."""
    chosen = {id(p) for p in muon_params(model)} if muon else set()
    hidden, decay, no_decay = [], [], []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in chosen:
            hidden.append(param)
        else:
            (decay if param.dim() >= 2 else no_decay).append(param)
    hidden.sort(key=lambda p: p.size(), reverse=True)
    groups = [{"params": hidden, "weight_decay": muon_weight_decay, "name": MUON}] if muon else []
    groups += [
        {"params": decay, "weight_decay": weight_decay, "name": DECAY},
        {"params": no_decay, "weight_decay": 0.0, "name": NO_DECAY},
    ]
    if muon:  # which half of DeepSpeed's Muon optimizer updates the group (trainer.engine.build tags the parameters)
        for group in groups:
            group["use_muon"] = group["name"] == MUON
    return [g for g in groups if g["params"]]


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


def set_lr(optimizer, names: list[str], lr: float, muon_lr: float = None) -> None:
    """The rates of the coming optimizer step: `muon_lr` in the Muon group, `lr` in every other group."""
    _check_groups(optimizer, names)
    for group, name in zip(optimizer.param_groups, names):
        group["lr"] = muon_lr if name == MUON else lr


def apply_hyperparameters(optimizer, names: list[str], *, betas: tuple, eps: float, weight_decay: float,
                          muon_momentum: float = None, muon_weight_decay: float = None,
                          adam_flags: dict = None, muon_ns: str = None) -> None:
    """Write the run's betas, eps and weight decay into the AdamW groups (the decay group gets
    `weight_decay`, the others 0), and momentum and weight decay into the Muon group. `names` are the
    groups' names in the order param_groups made them; DeepSpeed keeps that order (and drops nothing)
    in the groups of its own optimizers.

    `adam_flags` ({"fused": ..., "foreach": ...}, for torch's AdamW) pick its implementation in each
    AdamW group: DeepSpeed's Muon builds its AdamW without them, and a checkpoint load brings back the
    flags of the machine that saved it (foreach on a CPU, fused on a GPU). `muon_ns` is the Muon group's
    Newton-Schulz method where the trainer chooses it (trainer/engine/ds_config.py)."""
    _check_groups(optimizer, names)
    for group, name in zip(optimizer.param_groups, names):
        if name == MUON:
            group["momentum"] = muon_momentum
            group["weight_decay"] = muon_weight_decay
            if muon_ns is not None:
                group["ns_method"] = muon_ns
            continue
        group["betas"] = tuple(betas)
        group["eps"] = eps
        group["weight_decay"] = weight_decay if name == DECAY else 0.0
        if adam_flags is not None:
            group.update(adam_flags)
    if adam_flags is not None:
        _place_adam_steps(optimizer.state, adam_flags["fused"])


def _place_adam_steps(state, fused: bool) -> None:
    """torch's AdamW keeps each parameter's step count as a tensor: on the parameter's device for the fused
    kernel, a CPU scalar otherwise. A checkpoint made by the other implementation (or by DeepSpeed's
    FusedAdam, which counts in a Python int) is moved to where this one reads it; the count is exact. Every
    entry of the optimizer's state with Adam's moments counts (ZeRO-3 empties its groups' parameter lists
    between steps; Muon's entries hold a momentum and no step)."""
    import torch

    for entry in list(state.values()):
        if not isinstance(entry, dict) or "step" not in entry or "exp_avg" not in entry:
            continue
        device = entry["exp_avg"].device if fused else torch.device("cpu")
        step = entry["step"]
        if not (torch.is_tensor(step) and step.device == device and step.dtype == torch.float32):
            entry["step"] = torch.tensor(float(step), dtype=torch.float32, device=device)


def hyperparameters_in_effect(optimizer, names: list[str]) -> dict:
    """{group name: {lr, betas, eps, weight_decay}} (Muon: {lr, momentum, weight_decay}) as the optimizer
    holds them right now."""
    out = {}
    for name, group in zip(names, optimizer.param_groups):
        keys = ("lr", "momentum", "weight_decay") if name == MUON else ("lr", "betas", "eps", "weight_decay")
        out[name] = {k: list(group[k]) if k == "betas" else group[k] for k in keys}
    return out


def _check_groups(optimizer, names: list[str]) -> None:
    if len(optimizer.param_groups) != len(names):
        raise RuntimeError(f"optimizer has {len(optimizer.param_groups)} parameter groups, expected {len(names)}")
