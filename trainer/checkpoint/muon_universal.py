"""Universal checkpoints of Muon runs, which DeepSpeed 0.19's converter cannot read as they are.

`ds_to_universal` reads Adam's `exp_avg` / `exp_avg_sq` from every parameter group and fails with
KeyError 'exp_avg' on Muon's group, which holds a `momentum_buffer` instead; and its loader could not
place that momentum anyway (ZeRO-1/2 keep it per whole matrix on each rank that owns part of the
matrix, not in the partition layout the loader fills). So a Muon checkpoint is converted from a copy
whose Muon groups carry zero placeholders under Adam's names, and the placeholders are removed from
the result: a resume under another ZeRO stage or rank count carries the weights, AdamW's moments and
its step, and Muon's momentum restarts from zero (it rebuilds within ~1/(1 - momentum) steps). The
upstream report is bench/upstream_muon.md.
"""
import shutil
from pathlib import Path

import torch

from trainer.checkpoint import safe_load

PLACEHOLDERS = ("exp_avg", "exp_avg_sq")
SOURCE = "universal.src.tmp"


def placeholder_copy(ckpt: Path) -> Path:
    """A directory that ds_to_universal accepts: the model-state files linked, the optimizer shards
    rewritten with placeholder moments in place of each Muon group's momentum."""
    out = Path(ckpt) / SOURCE
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    for file in Path(ckpt).iterdir():
        if not file.is_file():
            continue
        if file.name.endswith("optim_states.pt"):
            state = safe_load.load(file, map_location="cpu")
            _replace_momentum(state["optimizer_state_dict"])
            torch.save(state, out / file.name)
        else:
            (out / file.name).symlink_to(file.resolve())
    return out


def _replace_momentum(optimizer_state: dict) -> None:
    if "base_optimizer_state" in optimizer_state:  # ZeRO-1/2
        groups = optimizer_state["base_optimizer_state"]["state"]
        flats = optimizer_state["single_partition_of_fp32_groups"]
    else:  # ZeRO-3
        groups, flats = optimizer_state["optimizer_state_dict"]["state"], optimizer_state["fp32_flat_groups"]
    for index, state in groups.items():
        if "momentum_buffer" in state:
            del state["momentum_buffer"]
            for key in PLACEHOLDERS:
                state[key] = torch.zeros_like(flats[index], dtype=torch.float32)


def drop_placeholders(universal: Path, model_config: dict) -> None:
    """Remove the placeholder moments of the Muon parameters from a converted universal checkpoint, so
    the loader gives Muon's group weights only (and Muon starts a fresh momentum)."""
    import models
    from trainer.train.optim import muon_params

    with torch.device("meta"):
        model = models.GPT(models.ModelConfig.from_dict(model_config))
    chosen = {id(p) for p in muon_params(model)}
    for name in (n for n, p in model.named_parameters() if id(p) in chosen):
        for key in PLACEHOLDERS:
            (Path(universal) / "zero" / name / f"{key}.pt").unlink(missing_ok=True)
