"""Atomic file writes: a reader sees the old file or the new one, never a half-written one.

Every file the trainer replaces in place (shards, meta.json, checkpoint markers, `latest`,
config.yaml) goes through here: write a temporary file beside the target, flush it to disk,
rename it over the target.
"""
import contextlib
import os
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """Open a temporary file beside `path`; on a clean exit it is synced and renamed over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
