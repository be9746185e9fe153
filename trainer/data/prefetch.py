"""The next step's batch, read while the current step runs.

On a GPU, this rank's slice of the next global batch is gathered from the memory-mapped shards on a
background thread and pinned, so its copy to the device is asynchronous and the step never waits on the
disk or on a host-to-device copy. On a CPU the batch is read in the foreground: there is no device to
overlap with, and a reader thread would only compete with the step for the same cores.
"""
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from trainer import dist


class Batches:
    """`segments_of` (the data source's `segments`, with --doc-masking) numbers the documents of each batch."""

    def __init__(self, stream, global_batch: int, device: torch.device, segments_of=None):
        self.stream, self.global_batch, self.segments_of = stream, global_batch, segments_of
        self.pin = device.type == "cuda"
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batches") if self.pin else None
        self.pending: Optional[tuple] = None  # (cursor, future) of the batch being read

    def at(self, cursor: int) -> tuple:
        """(inputs, targets, document numbers or None) of this rank for the global batch at `cursor`; starts
        reading the one after it."""
        if self.pending is not None and self.pending[0] == cursor:
            batch = self.pending[1].result()
        else:  # the first step, or the cursor moved (a rollback skipped data)
            batch = self._read(cursor)
        if self.pool is not None:
            following = cursor + self.global_batch
            self.pending = (following, self.pool.submit(self._read, following))
        return batch

    def _read(self, cursor: int) -> tuple:
        x, y = self.stream.local_batch(cursor, dist.rank(), dist.world_size())
        segments = self.segments_of(x) if self.segments_of is not None else None
        if self.pin:
            x, y = x.pin_memory(), y.pin_memory()
            segments = segments.pin_memory() if segments is not None else None
        return x, y, segments


def document_segments(segments, rows, device) -> Optional[torch.Tensor]:
    """The document numbers of micro-batch `rows` on `device`, or None when no sequence in it holds a document
    boundary: such a micro-batch is computed exactly as without document masking."""
    if segments is None:
        return None
    part = segments[rows]
    if not bool((part[:, -1] != part[:, 0]).any()):
        return None
    return part.to(device, non_blocking=True)
