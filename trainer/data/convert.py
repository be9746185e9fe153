"""Text or existing token files -> a validated shard dataset (train_*.bin, val_*.bin, meta.json).

Documents are tokenized in order (with `workers` processes, output order and bytes do not depend on
the worker count), each prefixed by the end-of-text id as in llm.c, so documents are separated by
it. Validation holds out whole documents: by default (`val_tokens=None`) a document goes to
validation when that keeps the validation split nearer 5% of the tokens read so far, up to 10M
tokens, so a small corpus keeps about 5% and a large one 10M tokens spread over its first 200M;
`val_tokens=N` holds out the first documents, N tokens' worth. A source with too few documents
for that (one .txt file, one jsonl record: the rule would hold out nothing, or everything) gets
its validation split from the tail of the token stream instead: 5% (at most 10M), or N tokens.
Train shards are closed at the first document boundary past `shard_tokens`. Shards are written
atomically and a state file records finished shards, so an interrupted conversion resumes without
redoing them; meta.json is written last and marks the dataset complete.
"""
import json
import multiprocessing as mp
import time
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from trainer.data import sources
from trainer.data.shards import write_shard
from trainer.data.tokenizer import get_tokenizer
from trainer.errors import UserError
from trainer.fileio import atomic_write_text

STATE = ".convert_state.json"
CHARS_PER_TASK = 2_000_000  # big tasks amortise process hand-off and tiktoken's per-call thread pool
VAL_FRACTION = 0.05         # default validation split: this fraction of the tokens...
VAL_CAP = 10_000_000        # ...up to this many tokens
FLAGS = {"source": "--source", "tokenizer": "--tokenizer", "text_field": "--text-field",
         "shard_tokens": "--shard-tokens", "val_tokens": "--val-tokens"}


def val_rule(val_tokens: Optional[int]) -> str:
    if val_tokens is None:
        return f"default: {VAL_FRACTION:.0%} of the tokens as whole documents, at most {VAL_CAP:,}"
    return f"the first documents, {val_tokens:,} tokens"


def _differences(saved: dict, identity: dict) -> str:
    """'--val-tokens 10000000 (now default)' for each setting that differs, as the flags spell them."""
    def show(key, value):
        return "default" if key == "val_tokens" and value is None else value

    return ", ".join(f"{FLAGS[k]} {show(k, saved.get(k))} (now {show(k, v)})"
                     for k, v in identity.items() if saved.get(k) != v)


def _identity(source, tokenizer, text_field, shard_tokens, val_tokens) -> dict:
    return {"source": source, "tokenizer": tokenizer, "text_field": text_field, "shard_tokens": shard_tokens,
            "val_tokens": val_tokens}


def _tokenize_chunk(args):
    spec, docs, threads = args
    tok = get_tokenizer(spec)
    encoded = tok.encode_batch(docs, threads=threads)
    return [np.asarray([tok.eot_id, *ids], dtype=np.uint32) for ids in encoded], sum(len(d.encode()) for d in docs)


def _chunks(documents, chars: int):
    chunk, size = [], 0
    for doc in documents:
        chunk.append(doc)
        size += len(doc)
        if size >= chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Writer:
    """Buffers token arrays per split and writes shards at the splits' boundaries, recording state."""

    def __init__(self, out: Path, vocab_size: int, state: dict):
        self.out, self.vocab_size, self.state = out, vocab_size, state
        self.buffers = {"train": [], "val": []}
        self.counts = {"train": 0, "val": 0}  # tokens in each buffer (kept, not summed: called per document)

    def add(self, split: str, tokens: np.ndarray):
        self.buffers[split].append(tokens)
        self.counts[split] += len(tokens)

    def buffered(self, split: str) -> int:
        return self.counts[split]

    def move(self, source: str, target: str):
        """Everything buffered for `source` goes to the end of `target`'s buffer."""
        self.buffers[target] += self.buffers[source]
        self.counts[target] += self.counts[source]
        self.buffers[source], self.counts[source] = [], 0

    def remove_unlisted(self):
        """Delete shard files the state no longer lists (train shards that a held-out tail was cut from)."""
        listed = {s["name"] for s in self.state["shards"]}
        for path in self.out.glob("*.bin"):
            if path.name not in listed:
                path.unlink()

    def written(self, split: Optional[str] = None) -> int:
        return sum(s["tokens"] for s in self.state["shards"] if split in (None, s["split"]))

    def flush(self, units_consumed: int, *splits: str):
        """Write the given splits' buffers (val first), then record how far the input was consumed."""
        for split in sorted(splits, reverse=True):
            if not self.buffers[split]:
                continue
            index = sum(1 for s in self.state["shards"] if s["split"] == split)
            name = f"{split}_{index:06d}.bin"
            info = write_shard(self.out / name, np.concatenate(self.buffers[split]), vocab_size=self.vocab_size)
            # `consumed`: the input read once this shard is written (a held-out tail may take the state back to it)
            self.state["shards"].append({"name": name, "split": split, **info, "consumed": units_consumed})
            self.buffers[split], self.counts[split] = [], 0
        self.state["consumed"] = units_consumed
        _write_json(self.out / STATE, self.state)


def _write_json(path: Path, data: dict):
    atomic_write_text(path, json.dumps(data, indent=1))


def convert(source: str, tokenizer: str, out_dir, shard_tokens: int = 100_000_000, val_tokens: Optional[int] = None,
            workers: int = 1, text_field: str = "text", progress: bool = True) -> dict:
    """Convert `source` into a dataset directory; returns its meta.json contents. val_tokens None: the default
    validation split (see the module docstring)."""
    if shard_tokens <= 0 or (val_tokens is not None and val_tokens < 0) or workers <= 0:
        raise UserError("--shard-tokens and --workers must be positive and --val-tokens non-negative")
    tok = get_tokenizer(tokenizer)
    out = Path(out_dir)
    identity = _identity(source, tokenizer, text_field, shard_tokens, val_tokens)
    meta_path, state_path = out / "meta.json", out / STATE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in identity} == identity:
            return meta  # already converted
        raise UserError(f"{out} already holds a different dataset, made with {_differences(meta, identity)}; "
                        "choose another --out, or delete that directory to convert again")
    if out.exists() and any(out.glob("*.bin")) and not state_path.is_file():
        raise UserError(f"{out} holds .bin files that are not from an interrupted conversion; choose another --out")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    state = {**identity, "shards": [], "consumed": 0}
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        if {k: saved.get(k) for k in identity} != identity:
            raise UserError(f"{out} holds an interrupted conversion made with {_differences(saved, identity)}; "
                            "rerun with its settings to finish it, or delete that directory (or choose another --out) "
                            "to start over with these")
        state = saved
        for shard in state["shards"]:
            if not (out / shard["name"]).is_file():
                raise UserError(f"{out / shard['name']} recorded as finished is missing; delete {out} and "
                                "convert again")
    for stale in out.glob("*.tmp*"):
        stale.unlink()

    writer = _Writer(out, tok.vocab_size, state)
    started = time.perf_counter()
    try:
        if sources.is_token_source(source):
            totals = _convert_tokens(source, tok, writer, shard_tokens, val_tokens, progress)
        else:
            totals = _convert_text(source, tokenizer, tok, writer, shard_tokens, val_tokens, workers, text_field,
                                   progress)
    except _AllValidation as e:  # nothing was written: leave no half-made directory behind
        if created and not any(out.iterdir()):
            out.rmdir()
        raise UserError(f"source '{source}' holds only {e.tokens:,} tokens, and --val-tokens {val_tokens} would hold "
                        f"all of them out for validation; pass a smaller --val-tokens (e.g. {e.tokens // 20}) or "
                        f"leave it out ({val_rule(None)})")
    splits = {s: writer.written(s) for s in ("train", "val")}
    if splits["train"] == 0:
        raise UserError(f"source '{source}' produced no training tokens (all of it went to validation: pass a "
                        "smaller --val-tokens, or --val-tokens 0 to train on everything)")
    meta = {**identity, "val_rule": val_rule(val_tokens), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id,
            "format": "llm.c shards v1/v2",
            "train_tokens": splits["train"], "val_tokens_written": splits["val"], "shards": state["shards"],
            **totals, "seconds": round(time.perf_counter() - started, 2)}
    _write_json(meta_path, meta)
    state_path.unlink(missing_ok=True)
    return meta


class _AllValidation(Exception):
    """The whole source fits in --val-tokens: raised before anything is written."""

    def __init__(self, tokens: int):
        self.tokens = tokens


def _convert_text(source, spec, tok, writer, shard_tokens, val_tokens, workers, text_field, progress):
    consumed = writer.state["consumed"]
    documents = islice(sources.iter_documents(source, text_field), consumed, None)  # resume: skip finished docs
    # One process: the tokenizer may use every core's threads; several: one thread each.
    threads = None if workers == 1 else 1
    chunks = ((spec, docs, threads) for docs in _chunks(documents, CHARS_PER_TASK))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
    # --val-tokens N: the first documents until N tokens; default: a fraction of what was read, capped.
    first_val_done = any(s["split"] == "val" for s in writer.state["shards"]) or val_tokens == 0
    val_total, seen = writer.written("val"), writer.written()
    n_docs, n_bytes, n_tokens = consumed, 0, 0
    bar = tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for arrays, chunk_bytes in results:
            for tokens in arrays:
                n_docs += 1
                n_tokens += len(tokens)
                seen += len(tokens)
                if val_tokens is None:  # whichever keeps the split nearer the fraction, never past the cap
                    to_val = (val_total + len(tokens) / 2 <= VAL_FRACTION * seen
                              and val_total + len(tokens) <= VAL_CAP)
                else:
                    to_val = not first_val_done
                writer.add("val" if to_val else "train", tokens)
                val_total += len(tokens) if to_val else 0
                if val_tokens is not None and to_val and writer.buffered("val") >= val_tokens:
                    first_val_done = True  # written with the first train shard (or at the end)
                elif writer.buffered("train") >= shard_tokens:
                    writer.flush(n_docs, "train", "val")  # together: the state then covers every document read
            n_bytes += chunk_bytes
            bar.update(chunk_bytes)
            bar.set_postfix(tokens_per_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if n_docs == 0:
        raise UserError(f"source '{source}' has no documents (empty input)")
    totals = {"documents": n_docs, "text_bytes": n_bytes}
    # Too few documents to hold out whole ones (one .txt file, one record): the tail of the token stream.
    tail = None
    if val_tokens is None and val_total == 0:
        tail = min(VAL_CAP, int(VAL_FRACTION * seen))
    elif val_tokens and writer.written("train") + writer.buffered("train") == 0:
        if writer.buffered("val") <= val_tokens:
            raise _AllValidation(writer.buffered("val"))
        writer.move("val", "train")
        tail = val_tokens
    if tail and (tail := _hold_out_tail(writer, tail)):
        totals["val_rule"] = (f"the last {tail:,} tokens of the token stream: the source has too few documents "
                              "to hold out whole ones")
    writer.flush(n_docs, "train", "val")
    writer.remove_unlisted()
    return totals


def _hold_out_tail(writer: "_Writer", n: int) -> int:
    """Make the last `n` tokens of the train split the validation split (the val buffer is empty). Train
    shards already written are read back as far as the tail reaches into them; the state then goes back
    to before them, written first, so a conversion interrupted while those shards are rewritten reads
    their documents again instead of trusting files cut short. Returns the tokens held out."""
    from trainer.data.shards import read_shard

    shards = writer.state["shards"]
    popped = False

    def poppable() -> bool:  # a train shard whose removal leaves a state to go back to
        return (bool(shards) and shards[-1]["split"] == "train" and "consumed" in shards[-1]
                and (len(shards) == 1 or "consumed" in shards[-2]))

    while writer.buffered("train") < n and poppable():
        writer.buffers["train"].insert(0, np.array(read_shard(writer.out / shards.pop()["name"])))
        writer.counts["train"] += len(writer.buffers["train"][0])
        popped = True
    if popped:
        writer.state["consumed"] = shards[-1]["consumed"] if shards else 0
        _write_json(writer.out / STATE, writer.state)
    n = min(n, writer.buffered("train"))  # (shards of an older conversion's state cannot be taken back)
    if n == 0:
        return 0
    stream = np.concatenate(writer.buffers["train"])
    writer.buffers["train"], writer.counts["train"] = [stream[:-n]], len(stream) - n
    writer.buffers["val"], writer.counts["val"] = [stream[-n:]], n
    return n


def _convert_tokens(source, tok, writer, shard_tokens, val_tokens, progress):
    if val_tokens is None:  # no documents to pick from: the first tokens, as many as the default allows
        val_tokens = int(min(VAL_CAP, VAL_FRACTION * sum(len(a) for a in sources.iter_token_arrays(source))))
    consumed = writer.state["consumed"]
    position = 0
    val_done = any(s["split"] == "val" for s in writer.state["shards"]) or val_tokens == 0
    bar = tqdm(desc=f"re-sharding {source}", unit="tok", unit_scale=True, disable=not progress)
    for array in sources.iter_token_arrays(source):
        if len(array) and int(array.max()) >= tok.vocab_size:
            raise UserError(f"{source} holds token id {int(array.max())} >= vocab size {tok.vocab_size} of tokenizer "
                            f"{tok.spec}; pass the --tokenizer these tokens were made with")
        start = max(0, consumed - position)
        position += len(array)
        while start < len(array):
            split = "train" if val_done else "val"
            limit = shard_tokens if val_done else val_tokens
            take = min(len(array) - start, limit - writer.buffered(split))
            writer.add(split, np.asarray(array[start:start + take], dtype=np.uint32))
            start += take
            bar.update(take)
            if writer.buffered(split) >= limit:
                writer.flush(position - (len(array) - start), split)
                val_done = True
    bar.close()
    if position == 0:
        raise UserError(f"source '{source}' holds no tokens")
    if not val_done:
        raise _AllValidation(writer.buffered("val"))
    writer.flush(position, "train", "val")
    return {"documents": None, "text_bytes": None}


def ensure_demo_data(out_dir="data/pydoc-gpt2", tokenizer: str = "gpt2") -> Path:
    """The offline demo dataset: Python's pydoc topics, about 5% held out for validation."""
    out = Path(out_dir)
    if not (out / "meta.json").is_file():
        print(f"preparing demo data: pydoc corpus -> {out} (tokenizer {tokenizer}, one-time)", flush=True)
    total = sum(len(get_tokenizer(tokenizer).encode(d)) + 1 for d in sources.iter_documents("pydoc"))
    convert("pydoc", tokenizer, out, shard_tokens=10_000_000, val_tokens=max(1, total // 20), workers=1,
            progress=False)
    return out
