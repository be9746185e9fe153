"""Recovery: resume only from sound checkpoints, turn failed saves into clear errors, roll back on NaN.

Three things a days-long run on preemptible machines needs beyond checkpoint.py:

- `find_resume`: checkpoint.find_resume picks the newest checkpoint with a COMPLETE marker; here its
  files are also checked (present, non-empty, readable zip archives: torch.save's format, so a
  truncated file has lost its central directory). `--resume auto` (or a run directory) falls back to
  the newest sound one and says so; an explicit damaged checkpoint is refused. Complete-but-damaged
  checkpoints only (something was lost) are refused too, never a silent fresh start.
- `save`: a full disk or an unwritable directory during a save is an OSError deep inside torch.save;
  it becomes one `Error:` line naming the checkpoint and the one that is still intact.
- `roll_back`: after `--max-skips` non-finite steps in a row (DeepSpeed already skipped each on every
  rank, weights and LR untouched), reload the newest sound checkpoint at or before the current step
  and move the data cursor past everything read since, the offending window included (PaLM's
  recipe for loss spikes: restart a little earlier and skip the batches around the spike). After
  `--max-rollbacks` rollbacks in one invocation the run stops with an error; the count lives in
  `state["rollbacks"]`, written into later checkpoints for the record but not read back on resume,
  so a resumed run (after the user lowered --lr, say) gets a fresh budget.
"""
import json
import zipfile
from pathlib import Path
from typing import Optional

from trainer import checkpoint, dist
from trainer.errors import UserError


def damage(ckpt: Path) -> Optional[str]:
    """None if a complete checkpoint's files look sound, else what is wrong with them (one phrase)."""
    ckpt = Path(ckpt)
    try:
        marker = checkpoint.read_marker(ckpt)
    except (OSError, ValueError) as e:
        return f"its {checkpoint.MARKER} marker is unreadable ({type(e).__name__})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not files:  # an older marker without the list: check what is there
        files = [str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt")]
        if checkpoint.model_states_file(ckpt) is None:
            return "it holds no model states file"
    for name in files:
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size == 0:
            return f"{name} is empty (0 bytes)"
        if path.suffix == ".pt" and not _zip_is_whole(path, size):
            return f"{name} is truncated or corrupt ({size:,} bytes)"
    return None


def _zip_is_whole(path: Path, size: int) -> bool:
    """torch.save writes a zip archive; every member must lie inside the file (cheap: reads the directory only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.header_offset + info.compress_size <= size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def find_resume(run_dir, resume: str) -> Optional[Path]:
    """checkpoint.find_resume, but a damaged checkpoint is never resumed from (see the module doc)."""
    ckpt = checkpoint.find_resume(run_dir, resume)
    if ckpt is None:
        return None
    problem = damage(ckpt)
    run = ckpt.parent.parent
    if problem is None:
        _note_stale_latest(run, ckpt)
        return ckpt
    if resume != "auto" and Path(resume).resolve() not in (run.resolve(), ckpt.parent.resolve()):
        raise UserError(f"--resume {resume}: checkpoint {ckpt} is damaged ({problem}); resume from an earlier "
                        "checkpoint or use --resume auto, which picks the newest sound one")
    damaged = [f"{ckpt.name}: {problem}"]
    for older in reversed(checkpoint.complete_checkpoints(run)):
        if older.name >= ckpt.name:
            continue
        problem = damage(older)
        if problem is None:
            dist.print0(f"warning: newest checkpoint {damaged[0]}; falling back to {older.name}"
                        + (f" (also damaged: {'; '.join(damaged[1:])})" if len(damaged) > 1 else ""))
            return older
        damaged.append(f"{older.name}: {problem}")
    raise UserError(f"every complete checkpoint in {checkpoint.checkpoints_dir(run)} is damaged "
                    f"({'; '.join(damaged)}); restore them from a copy, or start over with --resume never")


def _note_stale_latest(run: Path, chosen: Path) -> None:
    """`latest` is only informative here (resume scans the step dirs); say when it disagrees."""
    latest = checkpoint.checkpoints_dir(run) / checkpoint.LATEST
    try:
        named = latest.read_text().strip()
    except OSError:
        named = None
    if named != chosen.name and chosen.parent == checkpoint.checkpoints_dir(run):
        what = "is missing" if named is None else f"names {named or '(nothing)'}"
        dist.print0(f"note: {latest} {what}; resuming from the newest complete checkpoint {chosen.name}")


def save(engine, run_dir, step: int, client_state: dict, keep_last: int = 0) -> Path:
    """checkpoint.save; an OSError (disk full, read-only or missing directory) becomes one clear line.

    Every rank raises its own error; a rank whose writes succeeded waits in the next collective until
    the launcher (deepspeed / torchrun) sees the failed rank exit and stops it.
    """
    try:
        return checkpoint.save(engine, run_dir, step, client_state, keep_last=keep_last)
    except OSError as e:
        intact = next((c.name for c in reversed(checkpoint.complete_checkpoints(run_dir))
                       if c.name != checkpoint.tag_for(step)), None)
        where = e.filename or checkpoint.checkpoints_dir(run_dir)
        raise UserError(f"rank {dist.rank()} could not write checkpoint {checkpoint.tag_for(step)} "
                        f"({e.strerror or type(e).__name__}: {where}); free disk space or fix the permissions of "
                        f"{checkpoint.checkpoints_dir(run_dir)}, then resume: "
                        + (f"{intact} is complete and intact" if intact else "no earlier checkpoint exists")) from e


def roll_back(engine, run_dir, state: dict, cfg, skips: int) -> Path:
    """After `skips` consecutive non-finite steps: reload the last good checkpoint, skip the data read since.

    Updates `state` in place (step, tokens from the checkpoint; the cursor stays where it is, past the
    offending window; rollbacks + 1). Raises UserError when the budget is spent or nothing to go back to.
    """
    done = state.get("rollbacks", 0)
    limit = getattr(cfg, "max_rollbacks", 0)
    advice = "Lower --lr, raise --warmup-steps or check the data, then resume"
    if done >= limit:
        raise UserError(f"{skips} consecutive steps had non-finite loss or gradients (limit --max-skips "
                        f"{cfg.max_skips}) after {done} rollback(s) (limit --max-rollbacks {limit}); the last "
                        f"complete checkpoint is intact. {advice}")
    ckpt = _last_good(run_dir, state["step"])
    if ckpt is None:
        raise UserError(f"{skips} consecutive steps had non-finite loss or gradients (limit --max-skips "
                        f"{cfg.max_skips}) and there is no complete checkpoint to roll back to yet (save more "
                        f"often with --save-every). {advice}")
    load_path = ckpt
    if _engine_loads_universal(engine):  # this engine was built to load a universal checkpoint
        load_path = checkpoint.convert_to_universal(ckpt)
    elif checkpoint.saved_layout(ckpt) != {k: v for k, v in checkpoint.engine_layout(engine).items()
                                           if k in checkpoint.saved_layout(ckpt)}:
        raise UserError(f"{skips} consecutive non-finite steps; cannot roll back in place to {ckpt.name}, it was "
                        "saved under another ZeRO setup or rank count. Resume with --resume auto")
    client = checkpoint.load(engine, ckpt, load_path)
    # state["cursor"] stays: the batches since the checkpoint, the offending ones included, are not replayed.
    dist.print0(f"rolled back to {ckpt.name} (rollback {done + 1} of at most {limit}) after {skips} non-finite "
                f"steps in a row; skipping the data read since then, the offending batches included (samples "
                f"{client.get('cursor', 0)} to {state['cursor'] - 1}), so step {int(client['step']) + 1} trains on "
                f"sample {state['cursor']} onwards")
    state.update(step=int(client["step"]), tokens=int(client["tokens"]), rollbacks=done + 1)
    return ckpt


def _last_good(run_dir, step: int) -> Optional[Path]:
    for ckpt in reversed(checkpoint.complete_checkpoints(run_dir)):
        try:
            saved_step = json.loads((ckpt / checkpoint.MARKER).read_text()).get("step")
        except (OSError, ValueError):
            continue
        if saved_step is not None and saved_step <= step and damage(ckpt) is None:
            return ckpt
    return None


def _engine_loads_universal(engine) -> bool:
    check = getattr(engine, "load_universal_checkpoint", None)
    try:
        return bool(check()) if callable(check) else False
    except Exception:  # older DeepSpeed without the config field
        return False
