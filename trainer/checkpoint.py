"""Checkpoints: save, find, resume; the run's state travels inside them.

Layout (DESIGN.md): RUN/checkpoints/step_NNNNNNN/ written by DeepSpeed's save_checkpoint, plus
  rng/rank_R.pt     every rank's RNG states (DeepSpeed writes client_state from one rank only)
  COMPLETE          JSON marker written last, after a barrier: only then does the checkpoint count
RUN/checkpoints/latest names the newest complete checkpoint; it is replaced atomically after
the marker, so a crash at any moment leaves the previous complete checkpoint usable.
This module and trainer/engine.py are the only places that import deepspeed.
"""
import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer import dist
from trainer.errors import UserError

MARKER = "COMPLETE"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def read_marker(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save(engine, run_dir, step: int, client_state: dict, keep_last: int = 0) -> Path:
    """Write a checkpoint on all ranks; returns its directory once it is complete everywhere."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main() and ckpt.exists():
        # A leftover from a crash during an earlier save of this same step: never half-trust it.
        shutil.rmtree(ckpt)
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rng_dir = ckpt / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rng_dir / f"rank_{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        marker = {"step": step, "world_size": dist.world_size(), "zero_stage": engine.zero_optimization_stage(),
                  "files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())}
        _atomic_write(ckpt / MARKER, json.dumps(marker, indent=1))
        _atomic_write(root / LATEST, tag + "\n")
        if keep_last and keep_last > 0:
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt


def find_resume(run_dir, resume: str) -> Optional[Path]:
    """Which checkpoint to resume from: None for a fresh start, else a complete checkpoint dir."""
    if resume == "never":
        return None
    if resume != "auto":
        ckpt = Path(resume)
        if (ckpt / "checkpoints").is_dir():  # a run directory
            return find_resume(ckpt, "auto") or _missing(ckpt)
        if not ckpt.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint directory")
        if not is_complete(ckpt):
            raise UserError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: the save was "
                            "interrupted); pick an earlier one or use --resume auto")
        return ckpt
    candidates = complete_checkpoints(run_dir)
    return candidates[-1] if candidates else None


def _missing(run_dir):
    raise UserError(f"--resume {run_dir}: that run has no complete checkpoint to resume from")


def load(engine, ckpt: Path) -> dict:
    """Load engine state (weights, optimizer, scheduler) and this rank's RNG; returns client_state."""
    ckpt = Path(ckpt)
    _, client_state = engine.load_checkpoint(str(ckpt.parent), tag=ckpt.name, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None:
        raise UserError(f"could not load checkpoint {ckpt}: DeepSpeed found no model states in it")
    rng_file = ckpt / "rng" / f"rank_{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


# ---- consolidation for inference (eval-ppl, generate, zero_to_fp32; owner: eval engineer) ----------------
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Keys DeepSpeed itself writes into the model-states file; everything else there is our client_state.
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                   "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version", "sparse_tensor_module_names"}


def model_states_file(ckpt: Path) -> Optional[Path]:
    """The file holding client_state (and, below ZeRO-3, the module weights); None if not a DeepSpeed checkpoint."""
    return next((Path(ckpt) / n for n in MODEL_STATES_FILES if (Path(ckpt) / n).is_file()), None)


def consolidated_state_dict(ckpt: Path) -> tuple[dict, dict]:
    """(full fp32 state dict, client_state) of one DeepSpeed checkpoint dir, any ZeRO stage and rank count.

    Read directly from the ZeRO files in memory (no consolidation step on disk). Weights come from the
    fp32 master copies in the optimizer shards when there are any (ZeRO 1-3, bf16 ZeRO-0); fp32 ZeRO-0
    keeps the full weights in the module state itself. A tied lm_head comes back as an alias of the
    embedding it shares.
    """
    import contextlib
    import sys

    ckpt = Path(ckpt)
    states_file = model_states_file(ckpt)
    if states_file is None:
        raise UserError(f"{ckpt} is not a DeepSpeed checkpoint (none of {', '.join(MODEL_STATES_FILES)} in it)")
    states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
    client_state = {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for results / --json
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
    for alias, source in (states.get("shared_params") or {}).items():
        if alias not in state and source in state:
            state[alias] = state[source]
    return state, client_state
