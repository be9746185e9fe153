"""Token shards on disk and the deterministic, resumable streams that feed training and eval.

Shard format (llm.c / modded-nanogpt): 256 little-endian int32 header words ([0] magic 20240520,
[1] version 1 = uint16 tokens / 2 = uint32, [2] token count), then the tokens. A dataset is a
directory of train_*.bin, val_*.bin and meta.json. Every file is validated when opened, and a
failure names the file and the fix.

Training order is a pure function of (seed, dataset, seq_len, global batch, cursor): sample i of
the run is window perm_e[i mod n] of epoch e = i // n, where perm_e is a seeded permutation of
the n non-overlapping (seq_len + 1)-token windows. A checkpoint stores only the cursor, so resume
is O(1) and independent of the number of ranks.
"""
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

from trainer.errors import UserError
from trainer.fileio import atomic_open

MAGIC = 20240520
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
DTYPES = {1: np.uint16, 2: np.uint32}


def version_for(vocab_size: int) -> int:
    if vocab_size <= 2**16:
        return 1
    if vocab_size <= 2**32:
        return 2
    raise UserError(f"vocab size {vocab_size} does not fit in uint32 shards")


def write_shard(path, tokens, vocab_size: Optional[int] = None) -> dict:
    """Atomically write a shard (temp file + rename); returns {"tokens", "sha256"}."""
    path = Path(path)
    tokens = np.asarray(tokens)
    version = version_for(vocab_size if vocab_size is not None else int(tokens.max(initial=0)) + 1)
    data = tokens.astype(DTYPES[version], copy=False)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, version, len(data))
    digest = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for chunk in (header.tobytes(), data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()):
            f.write(chunk)
            digest.update(chunk)
    return {"tokens": int(len(data)), "sha256": digest.hexdigest()}


def read_header(path) -> tuple[int, int]:
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise UserError(f"cannot read shard {path}: {e.strerror}")
    if len(raw) < HEADER_BYTES:
        raise UserError(f"shard {path} is truncated ({size} bytes, shorter than the 1024-byte header); "
                        "re-create it with tools/convert_shards.py")
    header = np.frombuffer(raw, dtype="<i4")
    if header[0] != MAGIC:
        raise UserError(f"shard {path} has magic {header[0]}, expected {MAGIC}: not a token shard in the "
                        "llm.c format; convert it with tools/convert_shards.py (nanogpt:/npy:/llmc: sources)")
    version, count = int(header[1]), int(header[2])
    if count < 0:
        raise UserError(f"shard {path} has a negative token count in its header: corrupt; re-create it")
    if version not in DTYPES:
        raise UserError(f"shard {path} has version {version}; supported: 1 (uint16) and 2 (uint32)")
    expected = HEADER_BYTES + count * np.dtype(DTYPES[version]).itemsize
    if size != expected:
        raise UserError(f"shard {path} is {size} bytes but its header promises {count} tokens ({expected} bytes): "
                        "the file is truncated or corrupt; re-create it with tools/convert_shards.py")
    return version, count


def read_shard(path, vocab_size: Optional[int] = None) -> np.ndarray:
    """Memory-mapped tokens of a validated shard (ids checked against vocab_size when given)."""
    version, count = read_header(path)
    tokens = np.memmap(path, dtype=np.dtype(DTYPES[version]).newbyteorder("<"), mode="r", offset=HEADER_BYTES,
                       shape=(count,))
    if vocab_size is not None and count:
        top = int(tokens.max())
        if top >= vocab_size:
            raise UserError(f"shard {path} holds token id {top} >= vocab size {vocab_size}: it was made with another "
                            "tokenizer than meta.json says; re-convert the dataset")
    return tokens


class Dataset:
    """A validated dataset directory (train_*.bin, val_*.bin, meta.json)."""

    def __init__(self, path: Path, meta: dict, train: list, val: list):
        self.path, self.meta = path, meta
        self.train_shards, self.val_shards = train, val
        self.tokenizer_spec = meta["tokenizer"]
        self.vocab_size = int(meta["vocab_size"])
        self.eot_id = int(meta["eot_id"])
        self.train_tokens = sum(len(t) for t in train)
        self.val_tokens = sum(len(t) for t in val)

    @classmethod
    def open(cls, directory, expect_vocab_size: Optional[int] = None) -> "Dataset":
        path = Path(directory)
        meta_file = path / "meta.json"
        if not path.is_dir():
            raise UserError(f"dataset directory {path} does not exist; make one with tools/convert_shards.py")
        if not meta_file.is_file():
            raise UserError(f"{path} has no meta.json: not a dataset made by tools/convert_shards.py")
        try:
            meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{meta_file} is not valid JSON ({e.msg}); re-create the dataset")
        for key in ("tokenizer", "vocab_size", "eot_id"):
            if key not in meta:
                raise UserError(f"{meta_file} lacks '{key}'; re-create the dataset with tools/convert_shards.py")
        try:  # a hand-edited or damaged meta.json: name it, instead of a TypeError further down
            vocab = int(meta["vocab_size"])
            int(meta["eot_id"])
            recorded = {s["name"]: int(s["tokens"]) for s in meta.get("shards") or []}
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{meta_file} is malformed ({type(e).__name__}: {e}); re-create the dataset with "
                            "tools/convert_shards.py")
        if expect_vocab_size is not None and expect_vocab_size != vocab:
            raise UserError(f"dataset {path} has vocab size {vocab} but {expect_vocab_size} was expected")
        train = [read_shard(p, vocab) for p in sorted(path.glob("train_*.bin"))]
        val = [read_shard(p, vocab) for p in sorted(path.glob("val_*.bin"))]
        if not train:
            raise UserError(f"{path} has no train_*.bin shards")
        for name, count in recorded.items():
            actual = read_header(path / name)[1] if (path / name).is_file() else None
            if actual != count:
                raise UserError(f"{path / name}: meta.json records {count} tokens, the shard has {actual}; "
                                "the dataset is incomplete or mixed up, re-create it")
        return cls(path, meta, train, val)

    # ---- the data-source interface the training loop uses (trainer/train/loop.py; fine-tuning: trainer/sft/data.py)

    def train_stream(self, seq_len: int, global_batch: int, seed: int) -> "TrainStream":
        return TrainStream(self, seq_len, global_batch, seed)

    def val_stream(self, seq_len: int, batch_size: int) -> "ValStream":
        return ValStream(self, seq_len, batch_size)

    def describe(self) -> str:
        return f"{self.path} ({self.train_tokens:,} train tokens, tokenizer {self.tokenizer_spec})"

    def segments(self, x):
        """(B, T) document numbers of a batch for --doc-masking: every document starts with end-of-text."""
        return (x == self.eot_id).cumsum(dim=-1)

    def client_state(self) -> dict:
        """What checkpoints record about the data besides the tokenizer: nothing more for shards."""
        return {}

    def summary(self) -> dict:
        """Counts for the run's result line: none for shards."""
        return {}

    def record_in(self, run_dir) -> None:
        """Shards stay where they are; nothing to write into the run directory."""

    def train_tokens_array(self) -> np.ndarray:
        return _concat(self.train_shards)

    def val_tokens_array(self) -> np.ndarray:
        return _concat(self.val_shards)


def _concat(shards) -> np.ndarray:
    if len(shards) == 1:
        return shards[0]
    return np.concatenate([np.asarray(s) for s in shards]) if shards else np.zeros(0, dtype=np.uint16)


class _Windows:
    """Non-overlapping (seq_len + 1)-token windows over a list of shards, without concatenating them."""

    def __init__(self, shards, seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        # Windows never cross shard boundaries: each shard contributes (len - 1) // seq_len windows.
        counts = [max(0, (len(s) - 1) // seq_len) for s in shards]
        self.offsets = np.cumsum([0, *counts])
        self.count = int(self.offsets[-1])

    def get(self, index: int) -> np.ndarray:
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        start = (index - int(self.offsets[shard])) * self.seq_len
        return np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)


@lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The seeded permutation of n items that epoch `epoch` visits them in (shared by every stream)."""
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int64)


class TrainStream:
    """Global batches of training windows, addressed by a global sample cursor."""

    def __init__(self, dataset: Dataset, seq_len: int, global_batch: int, seed: int):
        self.windows = _Windows(dataset.train_shards, seq_len)
        if self.windows.count < global_batch:
            raise UserError(f"the training data has only {self.windows.count} windows of {seq_len + 1} tokens, fewer "
                            f"than one global batch of {global_batch}; use more data or a smaller batch/--seq-len")
        self.seq_len, self.global_batch, self.seed = seq_len, global_batch, seed
        self.samples_per_epoch = self.windows.count

    def sample(self, index: int) -> np.ndarray:
        epoch, position = divmod(index, self.samples_per_epoch)
        return self.windows.get(int(epoch_order(self.seed, epoch, self.samples_per_epoch)[position]))

    def local_batch(self, cursor: int, rank: int, world: int):
        """Rank `rank`'s contiguous slice of the global batch starting at sample `cursor`."""
        if self.global_batch % world:
            raise UserError(f"global batch {self.global_batch} is not divisible by {world} ranks")
        per_rank = self.global_batch // world
        first = cursor + rank * per_rank
        rows = np.stack([self.sample(i) for i in range(first, first + per_rank)])
        return _to_inputs_targets(rows)

    def scored_targets(self, cursor: int) -> None:
        """None: every target is scored, so each micro-batch's mean loss is already its share of the batch mean."""
        return None


class ValStream:
    """The fixed validation batches: the first windows of the validation shards, in order."""

    def __init__(self, dataset: Dataset, seq_len: int, batch_size: int):
        self.dataset = dataset
        self.windows = _Windows(dataset.val_shards, seq_len)
        self.batch_size = batch_size
        self.num_batches = self.windows.count // batch_size

    def count(self, n_batches: int) -> int:
        """How many batches an evaluation of `n_batches` scores (an error if there is none)."""
        if self.num_batches == 0:
            raise UserError(f"{self.dataset.path} has no validation batch of {self.batch_size} x "
                            f"{self.windows.seq_len + 1}"
                            " tokens; re-convert with a larger --val-tokens, or pass --eval-every 0")
        return min(n_batches, self.num_batches)

    def batch(self, b: int):
        rows = np.stack([self.windows.get(b * self.batch_size + i) for i in range(self.batch_size)])
        return _to_inputs_targets(rows)


def _to_inputs_targets(rows: np.ndarray):
    """(B, T+1) windows -> int64 tensors x = rows[:, :-1], y = rows[:, 1:]."""
    import torch  # imported here so conversion worker processes start without loading torch

    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
