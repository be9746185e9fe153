"""Fine-tuning examples -> training rows (x, y), with untrained targets set to IGNORE_INDEX.

A row holds seq_len + 1 tokens: x is the first seq_len, y the last seq_len, so y[j] is the token after
x[j]; y[j] is scored only where that token is trained (trainer/sft/examples.py), never on padding.

  packing (default)  whole examples one after another in a row while they fit, the rest padded; an
                     example is never split across rows. Examples in one row see the ones before them
                     (as documents do in pretraining windows); the model learns to start after an
                     end-of-text.
  padding            one example a row, padded.
Padding is the end-of-text id and never scored.

Order, as for pretraining windows (trainer/data/shards.py): the rows are made once, a pure function of (seed,
examples, seq_len) (packing takes the examples in a seeded shuffled order), and sample i of the run is
row perm_e[i mod n] of epoch e = i // n. A checkpoint's cursor is therefore all a resumed run needs, and
any rank count sees the same global batches. `scored_targets(cursor)` counts the trained targets of a
whole global batch, which the loop divides the summed loss by (one token-weighted mean per step,
whatever the split into micro-batches and ranks).
"""
import numpy as np

from models.loss import IGNORE_INDEX
from trainer.data.shards import epoch_order
from trainer.errors import UserError
from trainer.sft.examples import Examples


def pack(lengths, capacity: int) -> list[list[int]]:
    """Consecutive positions of `lengths` grouped greedily into rows of at most `capacity` tokens."""
    rows, current, used = [], [], 0
    for position, length in enumerate(lengths):
        if current and used + length > capacity:
            rows.append(current)
            current, used = [], 0
        current.append(position)
        used += int(length)
    if current:
        rows.append(current)
    return rows


class _Rows:
    """Rows of examples (lists of example indices) and how to turn them into (x, y) tensors."""

    def __init__(self, examples: Examples, rows: list[list[int]], seq_len: int, pad_id: int):
        self.examples, self.rows, self.seq_len, self.pad_id = examples, rows, seq_len, pad_id
        running = np.concatenate([[0], np.cumsum(examples.trained, dtype=np.int64)])
        per_example = running[examples.offsets[1:]] - running[examples.offsets[:-1]]
        self.scored = np.array([int(per_example[r].sum()) for r in rows], dtype=np.int64)  # targets per row

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """(seq_len + 1 token ids, seq_len + 1 trained flags) of row r."""
        tokens = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        trained = np.zeros(self.seq_len + 1, dtype=bool)
        at = 0
        for i in self.rows[r]:
            ids, mask = self.examples.get(i)
            tokens[at:at + len(ids)] = ids
            trained[at:at + len(ids)] = mask
            at += len(ids)
        return tokens, trained

    def batch(self, rows) -> tuple:
        import torch  # here, as in trainer/data/shards.py: only the loop needs torch

        built = [self.row(r) for r in rows]
        tokens = np.stack([t for t, _ in built])
        targets = np.where(np.stack([m for _, m in built])[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets)


def make_rows(examples: Examples, seq_len: int, packing: bool, order=None) -> list[list[int]]:
    """Rows of example indices; every example fits (at most seq_len tokens, see --max-seq-len)."""
    order = np.arange(len(examples)) if order is None else np.asarray(order)
    if not packing:
        return [[int(i)] for i in order]
    return [[int(order[p]) for p in row] for row in pack(examples.lengths[order], seq_len + 1)]


class SFTTrainStream:
    """Global batches of rows, addressed by a global sample cursor (the TrainStream interface)."""

    def __init__(self, examples: Examples, seq_len: int, global_batch: int, seed: int, packing: bool, pad_id: int):
        order = np.random.default_rng([seed, 1]).permutation(len(examples)) if packing else None
        self.rows = _Rows(examples, make_rows(examples, seq_len, packing, order), seq_len, pad_id)
        if len(self.rows) < global_batch:
            raise UserError(f"the training examples make only {len(self.rows)} rows of {seq_len + 1} tokens "
                            f"({'packed' if packing else 'one example each'}), fewer than one global batch of "
                            f"{global_batch}; use more data or a smaller batch")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.samples_per_epoch = len(self.rows)

    def row_index(self, sample: int) -> int:
        epoch, position = divmod(sample, self.samples_per_epoch)
        return int(epoch_order(self.seed, epoch, self.samples_per_epoch)[position])

    def local_batch(self, cursor: int, rank: int, world: int):
        """Rank `rank`'s contiguous slice of the global batch starting at sample `cursor`."""
        if self.global_batch % world:
            raise UserError(f"global batch {self.global_batch} is not divisible by {world} ranks")
        per_rank = self.global_batch // world
        first = cursor + rank * per_rank
        return self.rows.batch([self.row_index(i) for i in range(first, first + per_rank)])

    def scored_targets(self, cursor: int) -> int:
        """Trained targets in the whole global batch starting at `cursor` (all ranks)."""
        return int(sum(self.rows.scored[self.row_index(i)] for i in range(cursor, cursor + self.global_batch)))


class SFTValStream:
    """The held-out examples in file order, made into rows the way training makes them (the ValStream interface)."""

    def __init__(self, examples: Examples, seq_len: int, batch_size: int, packing: bool, pad_id: int):
        self.rows = _Rows(examples, make_rows(examples, seq_len, packing), seq_len, pad_id)
        self.batch_size = batch_size
        self.num_batches = len(self.rows) // batch_size

    def count(self, n_batches: int) -> int:
        if self.num_batches == 0:
            raise UserError(f"the held-out examples make {len(self.rows)} rows, less than one validation batch of "
                            f"{self.batch_size}; raise --val-fraction, lower --micro-batch, or pass --eval-every 0")
        return min(n_batches, self.num_batches)

    def batch(self, b: int):
        return self.rows.batch(range(b * self.batch_size, (b + 1) * self.batch_size))
