"""The checkpoint directory of a run: tags, the COMPLETE marker, `latest`, pruning and rewinds.

    RUN/checkpoints/step_NNNNNNN/     one checkpoint; it counts only once its COMPLETE marker exists
    RUN/checkpoints/latest            the newest complete checkpoint of the current timeline
    RUN/checkpoints/abandoned/NAME/   checkpoints set aside by a rewind: kept, never resumed from

A run has one timeline. When it continues from step N while checkpoints newer than N exist (a
rewind to an older checkpoint, `--resume never`, a fork from another run), those newer checkpoints
belong to a timeline that no longer leads anywhere: complete ones are moved under `abandoned/`,
incomplete ones (interrupted saves) are deleted. So `--resume auto` and `--keep-last` only ever see
the current timeline. The move is journalled, so a kill in the middle of it is finished on the
next start instead of leaving part of the old timeline resumable.

Pure file logic: no DeepSpeed, no torch.distributed. Callers run the writing functions on rank 0.
"""
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from trainer.fileio import atomic_write_text

MARKER = "COMPLETE"
LATEST = "latest"
ABANDONED = "abandoned"
REWIND_JOURNAL = "REWIND.json"
UNIVERSAL = "universal"  # a cached DeepSpeed universal copy inside a checkpoint dir
# The DeepSpeed file holding client_state (and, below ZeRO-3, the module weights).
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def step_of(ckpt) -> Optional[int]:
    """The step a `step_NNNNNNN` directory name stands for, else None."""
    name = Path(ckpt).name
    return int(name[5:]) if name.startswith("step_") and name[5:].isdigit() else None


def model_states_file(ckpt) -> Optional[Path]:
    """The model-states file of a DeepSpeed checkpoint dir; None if it is not one."""
    return next((Path(ckpt) / n for n in MODEL_STATES_FILES if (Path(ckpt) / n).is_file()), None)


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(ckpt) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def read_marker(ckpt) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def write_marker(ckpt, marker: dict) -> None:
    atomic_write_text(Path(ckpt) / MARKER, json.dumps(marker, indent=1))


def step_dirs(run_dir) -> list[Path]:
    """Every step_NNNNNNN directory of the current timeline, complete or not, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of the current timeline, oldest first."""
    return [p for p in step_dirs(run_dir) if is_complete(p)]


def read_latest(run_dir) -> Optional[str]:
    try:
        return (checkpoints_dir(run_dir) / LATEST).read_text().strip() or None
    except OSError:
        return None


def set_latest(run_dir, tag: Optional[str]) -> None:
    """Point `latest` at `tag` atomically (None removes it: the timeline has no checkpoint yet)."""
    path = checkpoints_dir(run_dir) / LATEST
    if tag is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, tag + "\n")


def prune(run_dir, keep_last: int, current_step: int) -> list[str]:
    """Delete the oldest complete checkpoints so `keep_last` remain; returns the deleted tags.

    Only checkpoints older than `current_step` are candidates: the checkpoint just written (and
    anything newer, which a rewind has already moved aside) is never deleted.
    """
    if not keep_last or keep_last <= 0:
        return []
    complete = complete_checkpoints(run_dir)
    older = [c for c in complete if step_of(c) < current_step]
    keep_older = max(0, keep_last - (len(complete) - len(older)))
    doomed = older[:max(0, len(older) - keep_older)]
    for old in doomed:
        (old / MARKER).unlink(missing_ok=True)  # first: a kill mid-delete leaves an incomplete dir, never resumed
        shutil.rmtree(old, ignore_errors=True)
    return [c.name for c in doomed]


def set_aside_newer(run_dir, step: int, reason: str) -> Optional[Path]:
    """Start the timeline at `step`: move complete checkpoints newer than `step` to abandoned/, delete
    incomplete ones. Returns the abandoned/ directory they went to (None if none were complete)."""
    root = checkpoints_dir(run_dir)
    newer = [p for p in step_dirs(run_dir) if step_of(p) > step]
    if not newer:
        return None
    complete = [p.name for p in newer if is_complete(p)]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    into = root / ABANDONED / f"{stamp}-after-{tag_for(step)}" if complete else None
    journal = {"step": step, "reason": reason, "into": str(into.relative_to(root)) if into else None,
               "move": complete, "delete": [p.name for p in newer if p.name not in complete]}
    atomic_write_text(root / REWIND_JOURNAL, json.dumps(journal, indent=1))
    finish_rewind(run_dir)
    return into


def finish_rewind(run_dir) -> None:
    """Carry out a journalled rewind (again, if a kill interrupted it); idempotent."""
    root = checkpoints_dir(run_dir)
    journal_file = root / REWIND_JOURNAL
    if not journal_file.is_file():
        return
    journal = json.loads(journal_file.read_text())
    if journal["move"]:
        into = root / journal["into"]
        into.mkdir(parents=True, exist_ok=True)
        for name in journal["move"]:
            if (root / name).is_dir():
                (root / name).rename(into / name)
    for name in journal["delete"]:
        shutil.rmtree(root / name, ignore_errors=True)
    journal_file.unlink()
