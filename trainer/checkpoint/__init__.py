"""Checkpoints: every decision about them in one place, `Checkpointer`, over a few small modules.

    store.py        the directory: tags, COMPLETE marker, `latest`, pruning, rewinds (no DeepSpeed)
    integrity.py    is a checkpoint whole (before anything is loaded)
    resolve.py      which checkpoint: the one rule for resume, export, evaluation and --init-from
    layout.py       ZeRO stage / precision / rank count of a checkpoint; universal conversion
    engine_io.py    save and load through a live DeepSpeed engine (with RNG states)
    consolidate.py  one full fp32 state dict from any checkpoint; "same architecture?"

Layout on disk: RUN/checkpoints/step_NNNNNNN/ (DeepSpeed's files, rng/rank_R.pt, COMPLETE written
last), RUN/checkpoints/latest, RUN/checkpoints/abandoned/ (see store.py). DeepSpeed is imported in
this package and in trainer/engine/build.py only.
"""
import time
from pathlib import Path
from typing import Optional

from trainer import dist
from trainer.checkpoint.consolidate import architecture_differences, check_model, client_state, consolidated_state_dict
from trainer.checkpoint.engine_io import load, save
from trainer.checkpoint.integrity import check_shards, damage
from trainer.checkpoint.layout import (
    config_layout,
    convert_to_universal,
    engine_layout,
    needs_conversion,
    prepare_resume,
    saved_layout,
)
from trainer.checkpoint.resolve import find_resume, newest_sound, resolve_checkpoint
from trainer.checkpoint.store import (
    ABANDONED,
    LATEST,
    MARKER,
    UNIVERSAL,
    checkpoints_dir,
    complete_checkpoints,
    finish_rewind,
    is_complete,
    model_states_file,
    read_latest,
    read_marker,
    set_aside_newer,
    set_latest,
    step_dirs,
    step_of,
    tag_for,
)
from trainer.errors import UserError

__all__ = ["Checkpointer", "ABANDONED", "LATEST", "MARKER", "UNIVERSAL", "architecture_differences", "check_model",
           "check_shards", "checkpoints_dir", "client_state", "complete_checkpoints", "config_layout",
           "consolidated_state_dict", "convert_to_universal", "damage", "engine_layout", "find_resume",
           "is_complete", "load", "model_states_file", "needs_conversion", "newest_sound", "prepare_resume",
           "read_latest", "read_marker", "resolve_checkpoint", "save", "saved_layout", "step_dirs", "step_of",
           "tag_for"]


class Checkpointer:
    """A training run's checkpoints: which one to resume, when to save, what leaves the timeline, where
    to roll back to. Methods are called on every rank; file changes happen on rank 0."""

    def __init__(self, run_dir, save_every: int = 0, keep_last: int = 0):
        self.run_dir = Path(run_dir)
        self.save_every, self.keep_last = save_every, keep_last
        self.resume_from: Optional[Path] = None
        self.load_path: Optional[Path] = None
        self.slowest_save = 0.0  # seconds; the stop policy keeps room for one more save

    # ---- before the engine exists ----

    def choose(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from (None: a fresh start), after finishing an interrupted rewind."""
        if dist.is_main():
            finish_rewind(self.run_dir)
        dist.barrier()
        self.resume_from = find_resume(self.run_dir, resume)
        if self.resume_from is None and resume == "auto" and step_dirs(self.run_dir):
            dist.print0(f"note: {checkpoints_dir(self.run_dir)} holds no complete checkpoint; starting fresh")
        return self.resume_from

    def prepare(self, model_config: dict, ds_config: dict, world_size: int, global_batch: int) -> dict:
        """Check the architecture and layout of the chosen checkpoint; returns the DeepSpeed config to build
        the engine with (a universal-checkpoint load when the ZeRO setup or rank count changed)."""
        check_model(self.resume_from, model_config)
        self.load_path, ds_config = prepare_resume(self.resume_from, world_size, ds_config, global_batch)
        return ds_config

    # ---- with the engine ----

    def load(self, engine) -> dict:
        """Load the chosen checkpoint into the engine; returns its client_state."""
        return load(engine, self.resume_from, self.load_path)

    def start_timeline(self, step: int) -> None:
        """The run continues from `step`: checkpoints newer than it leave the timeline (see store.py)."""
        if dist.is_main():
            reason = f"resumed from {self.resume_from}" if self.resume_from is not None else "fresh start"
            into = set_aside_newer(self.run_dir, step, reason)
            current = complete_checkpoints(self.run_dir)
            set_latest(self.run_dir, current[-1].name if current else None)
            if into is not None:
                moved = ", ".join(sorted(p.name for p in into.iterdir()))
                dist.print0(f"the run continues from step {step}: the newer checkpoints {moved} belong to an abandoned "
                            f"timeline and were moved to {into} (kept, never resumed from; delete it when you no "
                            "longer need it)")
        dist.barrier()

    def due(self, step: int, last: bool = False) -> bool:
        return last or bool(self.save_every and step % self.save_every == 0)

    def save(self, engine, step: int, client: dict) -> Path:
        started = time.perf_counter()
        path = save(engine, self.run_dir, step, client, keep_last=self.keep_last)
        self.slowest_save = max(self.slowest_save, time.perf_counter() - started)
        return path

    def roll_back(self, engine, step: int) -> tuple[Path, dict]:
        """Reload the newest sound checkpoint at or before `step`; returns (it, its client_state).

        Raises UserError when there is none or it was saved under another layout than this engine's.
        """
        ckpt = next((c for c in reversed(complete_checkpoints(self.run_dir))
                     if step_of(c) <= step and damage(c) is None), None)
        if ckpt is None:
            raise UserError("there is no complete checkpoint to roll back to yet (save more often with --save-every)")
        load_path = ckpt
        if _engine_loads_universal(engine):  # this engine was built to load a universal checkpoint
            load_path = convert_to_universal(ckpt)
        elif saved_layout(ckpt) != {k: v for k, v in engine_layout(engine).items() if k in saved_layout(ckpt)}:
            raise UserError(f"cannot roll back in place to {ckpt.name}: it was saved under another ZeRO setup or "
                            "rank count. Resume with --resume auto")
        client = load(engine, ckpt, load_path)
        self.start_timeline(step_of(ckpt))
        return ckpt, client


def _engine_loads_universal(engine) -> bool:
    check = getattr(engine, "load_universal_checkpoint", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # older DeepSpeed without the config field
        return False
