"""Tokenized fine-tuning examples on disk: a directory of .npy arrays and a meta.json written last.

    DIR/train_tokens.npy, train_trained.npy, train_offsets.npy   (trainer/sft/examples.py: Examples)
    DIR/val_tokens.npy, val_trained.npy, val_offsets.npy
    DIR/meta.json   {"kind": "sft", "identity": what made them, "stats": counts}

`identity` is what the examples are a function of: the data source (and, for local files, a digest of
their bytes), the layout, the template's four parts, the tokenizer, --max-seq-len and --val-fraction.
A run keeps its examples in RUN/sft/, so a resumed run trains on exactly the data of the checkpoint's
cursor even when the source changed or came from the hub; a directory like it can also be given to
`finetune --data` directly. Arrays are written atomically and meta.json last, so a directory with a
meta.json is complete.
"""
import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np

from trainer.errors import UserError
from trainer.sft.examples import Examples

META = "meta.json"
ARRAYS = ("tokens", "trained", "offsets")


def is_store(directory) -> bool:
    path = Path(directory) / META
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == "sft"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def fingerprint(spec: str) -> Optional[str]:
    """sha256 over the names and bytes of a local source's files; None for hf: sources (not read twice)."""
    if spec.startswith("hf:"):
        return None
    from trainer.data.sources import source_files

    digest = hashlib.sha256()
    for path in source_files(spec):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write(directory, train: Examples, val: Examples, identity: dict, stats: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META).unlink(missing_ok=True)  # incomplete until rewritten last
    for split, examples in (("train", train), ("val", val)):
        for name in ARRAYS:
            target = directory / f"{split}_{name}.npy"
            tmp = directory / f".{split}_{name}.tmp{os.getpid()}.npy"
            np.save(tmp, getattr(examples, name))
            tmp.replace(target)
    tmp = directory / f".{META}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"kind": "sft", "identity": identity, "stats": stats}, indent=1))
    tmp.replace(directory / META)


def read_meta(directory) -> dict:
    path = Path(directory) / META
    try:
        meta = json.loads(path.read_text())
        meta["identity"], meta["stats"]  # noqa: B018 - both must be there
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a readable fine-tuning data record ({type(e).__name__}); delete "
                        f"{Path(directory)} to tokenize the data again")
    return meta


def read(directory) -> tuple[Examples, Examples, dict]:
    """(train, val, meta) of a complete directory, memory-mapped."""
    directory = Path(directory)
    meta = read_meta(directory)
    splits = []
    for split in ("train", "val"):
        try:
            arrays = {name: np.load(directory / f"{split}_{name}.npy", mmap_mode="r") for name in ARRAYS}
        except (OSError, ValueError) as e:
            raise UserError(f"{directory}: {split} examples cannot be read ({e}); delete the directory to tokenize "
                            "the data again")
        examples = Examples(**arrays)
        if len(examples.offsets) < 1 or int(examples.offsets[-1]) != len(examples.tokens) \
                or len(examples.trained) != len(examples.tokens):
            raise UserError(f"{directory}: the {split} arrays disagree in length (damaged); delete the directory to "
                            "tokenize the data again")
        splits.append(examples)
    return splits[0], splits[1], meta


def differences(saved: dict, wanted: dict) -> str:
    """'template plain (now chatml), max_seq_len 64 (now 128)' for every identity entry that differs."""
    def show(value):
        return value.get("name") if isinstance(value, dict) and "name" in value else value

    return ", ".join(f"{k} {show(saved.get(k))} (now {show(v)})" for k, v in wanted.items() if saved.get(k) != v)
