"""Which checkpoint? One rule for resume, export, evaluation and --init-from.

A run's checkpoint is its newest complete and sound one (trainer.checkpoint.integrity): a damaged
newest checkpoint is skipped, named, and the next older sound one is used. `latest` only names
that checkpoint for people and for other programs; it is never trusted over the step directories,
so a stale or missing `latest` changes nothing. A DeepSpeed checkpoint root written by another
program (no COMPLETE markers) is read through its `latest`.
"""
from pathlib import Path
from typing import Optional

from trainer import dist
from trainer.checkpoint.integrity import damage
from trainer.checkpoint.store import (
    LATEST,
    MARKER,
    UNIVERSAL,
    checkpoints_dir,
    complete_checkpoints,
    is_complete,
    model_states_file,
    read_latest,
    tag_for,
)
from trainer.errors import UserError


def newest_sound(run_dir) -> Optional[Path]:
    """The run's checkpoint (see the module doc); None if it has no complete one."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(run_dir)):
        problem = damage(ckpt)
        if problem is None:
            if damaged:
                dist.print0(f"warning: newest checkpoint {damaged[0]}; falling back to {ckpt.name}"
                            + (f" (also damaged: {'; '.join(damaged[1:])})" if len(damaged) > 1 else ""))
            return ckpt
        damaged.append(f"{ckpt.name}: {problem}")
    if damaged:
        raise UserError(f"every complete checkpoint in {checkpoints_dir(run_dir)} is damaged "
                        f"({'; '.join(damaged)}); restore them from a copy, or start over with --resume never")
    return None


def find_resume(run_dir, resume: str) -> Optional[Path]:
    """`--resume auto|never|PATH` -> the checkpoint to resume from, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        ckpt = newest_sound(run_dir)
        if ckpt is not None:
            _note_stale_latest(run_dir, ckpt)
        return ckpt
    path = Path(resume)
    if path.name == "checkpoints" and path.is_dir():  # a run's checkpoints dir: its run
        path = path.parent
    if (path / "checkpoints").is_dir():  # a run directory: its checkpoint, by the same rule
        ckpt = newest_sound(path)
        if ckpt is None:
            raise UserError(f"--resume {resume}: that run has no complete checkpoint to resume from")
        return ckpt
    if not path.is_dir():
        raise UserError(f"--resume {resume}: no such checkpoint directory")
    if path.name == UNIVERSAL and is_complete(path.parent):  # the cached universal copy: resume its source
        path = path.parent
    if not is_complete(path):
        raise UserError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: the save was "
                        "interrupted); pick an earlier one or use --resume auto")
    problem = damage(path)
    if problem is not None:
        raise UserError(f"--resume {resume}: checkpoint {path} is damaged ({problem}); resume from an earlier "
                        "checkpoint or use --resume auto, which picks the newest sound one")
    return path


def _note_stale_latest(run_dir, chosen: Path) -> None:
    named = read_latest(run_dir)
    if named != chosen.name:
        what = "is missing" if named is None else f"names {named}"
        dist.print0(f"note: {checkpoints_dir(run_dir) / LATEST} {what}; resuming from the newest complete "
                    f"checkpoint {chosen.name}")


def resolve_checkpoint(path, tag: Optional[str] = None) -> Path:
    """A checkpoint dir from a run dir (its checkpoint by the rule above, or --tag), a checkpoints/ dir,
    or a checkpoint dir itself. TAG is a directory name (step_0000100) or a step number (100)."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such directory (expected a run directory or a checkpoint directory)")
    if model_states_file(p) is not None:  # a checkpoint dir itself
        if tag is not None:
            raise UserError(f"--tag {tag} given but {path} is already a checkpoint directory; pass its run directory")
        return p
    if (p / "checkpoints").is_dir() or p.name == "checkpoints":
        run = p if (p / "checkpoints").is_dir() else p.parent
    else:  # a DeepSpeed checkpoint root written by another program: it names its newest in `latest`
        named = (p / LATEST).read_text().strip() if (p / LATEST).is_file() else None
        if tag is None and named and (p / named).is_dir():
            return p / named
        run = None
    root = checkpoints_dir(run) if run is not None else p
    if tag is not None:
        name = tag_for(int(tag)) if str(tag).isdigit() else str(tag)
        ckpt = root / name
        if not ckpt.is_dir():
            have = ", ".join(sorted(q.name for q in root.glob("step_*"))) or "none"
            raise UserError(f"--tag {tag}: {ckpt} does not exist (checkpoints there: {have})")
        return ckpt
    ckpt = newest_sound(run) if run is not None else None
    if ckpt is None:
        raise UserError(f"{path} holds no complete checkpoint (none of its step_* dirs has a {MARKER} marker)")
    return ckpt
