"""Is a checkpoint whole? Cheap checks that run before anything is loaded.

A COMPLETE marker lists the checkpoint's files; each must exist, be non-empty and, for torch.save's
zip archives, have every member inside the file (a truncated file loses its central directory).
`check_shards` also covers checkpoints without our marker (another program's DeepSpeed checkpoint,
an interrupted save) by counting the optimizer shards DeepSpeed needs.
"""
import zipfile
from pathlib import Path
from typing import Optional

from trainer.checkpoint import contents, safe_load
from trainer.checkpoint.store import MARKER, is_complete, model_states_file, read_marker
from trainer.errors import UserError


def damage(ckpt) -> Optional[str]:
    """None if a complete checkpoint's files look sound, else what is wrong with them (one phrase)."""
    ckpt = Path(ckpt)
    try:
        marker = read_marker(ckpt)
    except (OSError, ValueError) as e:
        return f"its {MARKER} marker is unreadable ({type(e).__name__})"
    files = marker.get("files") if isinstance(marker, dict) else None
    if not files:  # an older marker without the list: check what is there
        files = [str(p.relative_to(ckpt)) for p in ckpt.rglob("*.pt")]
        if model_states_file(ckpt) is None:
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
    """torch.save writes a zip archive; every member must lie inside the file (reads the directory only)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return all(info.header_offset + info.compress_size <= size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return False


def check_shards(ckpt) -> dict:
    """Refuse a partial checkpoint in plain words; returns its marker ({} for a foreign DeepSpeed checkpoint)."""
    ckpt = Path(ckpt)
    states_file = model_states_file(ckpt)
    if states_file is None:
        raise UserError(f"{ckpt} is not a DeepSpeed checkpoint: it has no mp_rank_00_model_states.pt "
                        "(was the save interrupted before any file was written?)")
    if is_complete(ckpt):
        marker = read_marker(ckpt)
        missing = [f for f in marker.get("files", []) if not (ckpt / f).is_file()]
        if missing:
            raise UserError(f"checkpoint {ckpt} is damaged: {len(missing)} of its {len(marker['files'])} files are "
                            f"gone (e.g. {missing[0]}); use another checkpoint")
        problem = damage(ckpt)
        if problem is not None:
            raise UserError(f"checkpoint {ckpt} is damaged: {problem}; use another checkpoint")
        return marker
    states = safe_load.load(states_file, map_location="cpu", mmap=True)
    expected = int(states.get("dp_world_size") or 1)
    shards = sorted(ckpt.glob("*optim_states.pt"))
    if shards and len(shards) != expected:
        raise UserError(f"checkpoint {ckpt} is incomplete: it was saved by {expected} ranks, so it needs {expected} "
                        f"optimizer shard files (*optim_states.pt), but only {len(shards)} are there; the save was "
                        "interrupted. Use an earlier checkpoint")
    if (ckpt / contents.RNG_DIR).is_dir():  # one of ours without its marker: DeepSpeed may still have been writing
        raise UserError(f"checkpoint {ckpt} is incomplete: it has no {MARKER} marker (the save was interrupted); "
                        "use an earlier checkpoint")
    return {}
