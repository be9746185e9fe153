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
