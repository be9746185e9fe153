"""Text or existing token files -> a validated shard dataset (train_*.bin, val_*.bin, meta.json).

Documents are tokenized in order (with `workers` processes, output order and bytes do not depend on
the worker count), each prefixed by the end-of-text id as in llm.c, so documents are separated by
it. The first documents, whole, make the validation split (`val_tokens`); train shards are closed
at the first document boundary past `shard_tokens`. Shards are written atomically and a state file
records finished shards, so an interrupted conversion resumes without redoing them; meta.json is
written last and marks the dataset complete.
"""
import json
import multiprocessing as mp
import time
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm import tqdm

from trainer import sources
from trainer.data import write_shard
from trainer.errors import UserError
from trainer.tokenizer import get_tokenizer

STATE = ".convert_state.json"
CHARS_PER_TASK = 2_000_000  # big tasks amortise process hand-off and tiktoken's per-call thread pool


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
    """Accumulates token arrays and writes shards at the split's boundaries, recording state."""

    def __init__(self, out: Path, vocab_size: int, state: dict):
        self.out, self.vocab_size, self.state = out, vocab_size, state
        self.buffer, self.buffered = [], 0

    def add(self, tokens: np.ndarray):
        self.buffer.append(tokens)
        self.buffered += len(tokens)

    def flush(self, split: str, units_consumed: int):
        if not self.buffered:
            return
        index = sum(1 for s in self.state["shards"] if s["split"] == split)
        name = f"{split}_{index:06d}.bin"
        info = write_shard(self.out / name, np.concatenate(self.buffer), vocab_size=self.vocab_size)
        self.state["shards"].append({"name": name, "split": split, **info})
        self.state["consumed"] = units_consumed
        _write_json(self.out / STATE, self.state)
        self.buffer, self.buffered = [], 0


def _write_json(path: Path, data: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def convert(source: str, tokenizer: str, out_dir, shard_tokens: int = 100_000_000, val_tokens: int = 10_000_000,
            workers: int = 1, text_field: str = "text", progress: bool = True) -> dict:
    """Convert `source` into a dataset directory; returns its meta.json contents."""
    if shard_tokens <= 0 or val_tokens < 0 or workers <= 0:
        raise UserError("--shard-tokens and --workers must be positive and --val-tokens non-negative")
    tok = get_tokenizer(tokenizer)
    out = Path(out_dir)
    identity = _identity(source, tokenizer, text_field, shard_tokens, val_tokens)
    meta_path, state_path = out / "meta.json", out / STATE
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in identity} == identity:
            return meta  # already converted
        raise UserError(f"{out} already holds a different dataset (source {meta.get('source')}, tokenizer "
                        f"{meta.get('tokenizer')}); choose another --out or delete that directory")
    if out.exists() and any(out.glob("*.bin")) and not state_path.is_file():
        raise UserError(f"{out} holds .bin files that are not from an interrupted conversion; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    state = {**identity, "shards": [], "consumed": 0}
    if state_path.is_file():
        saved = json.loads(state_path.read_text())
        if {k: saved.get(k) for k in identity} != identity:
            raise UserError(f"{out} holds an interrupted conversion of another source/tokenizer; choose another --out")
        state = saved
        for shard in state["shards"]:
            if not (out / shard["name"]).is_file():
                raise UserError(f"{out / shard['name']} recorded as finished is missing; delete {out} and convert again")
    for stale in out.glob("*.tmp*"):
        stale.unlink()

    writer = _Writer(out, tok.vocab_size, state)
    started = time.perf_counter()
    if sources.is_token_source(source):
        totals = _convert_tokens(source, tok, writer, shard_tokens, val_tokens, progress)
    else:
        totals = _convert_text(source, tokenizer, tok, writer, shard_tokens, val_tokens, workers, text_field, progress)
    splits = {s: sum(x["tokens"] for x in state["shards"] if x["split"] == s) for s in ("train", "val")}
    if splits["train"] == 0:
        raise UserError(f"source '{source}' produced no training tokens (empty input, or everything went to "
                        f"validation: lower --val-tokens)")
    meta = {**identity, "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "format": "llm.c shards v1/v2",
            "train_tokens": splits["train"], "val_tokens_written": splits["val"], "shards": state["shards"],
            **totals, "seconds": round(time.perf_counter() - started, 2)}
    _write_json(meta_path, meta)
    state_path.unlink(missing_ok=True)
    return meta


def _convert_text(source, spec, tok, writer, shard_tokens, val_tokens, workers, text_field, progress):
    consumed = writer.state["consumed"]
    documents = islice(sources.iter_documents(source, text_field), consumed, None)  # resume: skip finished docs
    # One process: the tokenizer may use every core's threads; several: one thread each.
    threads = None if workers == 1 else 1
    chunks = ((spec, docs, threads) for docs in _chunks(documents, CHARS_PER_TASK))
    pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
    results = pool.imap(_tokenize_chunk, chunks) if pool else map(_tokenize_chunk, chunks)
    val_done = any(s["split"] == "val" for s in writer.state["shards"]) or val_tokens == 0
    n_docs, n_bytes, n_tokens = consumed, 0, 0
    bar = tqdm(desc=f"tokenizing {source}", unit="B", unit_scale=True, disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    try:
        for arrays, chunk_bytes in results:
            for tokens in arrays:
                n_docs += 1
                n_tokens += len(tokens)
                writer.add(tokens)
                if not val_done and writer.buffered >= val_tokens:
                    writer.flush("val", n_docs)
                    val_done = True
                elif val_done and writer.buffered >= shard_tokens:
                    writer.flush("train", n_docs)
            n_bytes += chunk_bytes
            bar.update(chunk_bytes)
            bar.set_postfix(tokens_per_s=f"{n_tokens / max(time.perf_counter() - started, 1e-9):,.0f}")
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if n_docs == 0:
        raise UserError(f"source '{source}' has no documents (empty input)")
    writer.flush("train" if val_done else "val", n_docs)
    return {"documents": n_docs, "text_bytes": n_bytes}


def _convert_tokens(source, tok, writer, shard_tokens, val_tokens, progress):
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
            limit = val_tokens if not val_done else shard_tokens
            take = min(len(array) - start, limit - writer.buffered)
            writer.add(np.asarray(array[start:start + take], dtype=np.uint32))
            start += take
            bar.update(take)
            if writer.buffered >= limit:
                writer.flush("train" if val_done else "val", position - (len(array) - start))
                val_done = True
    bar.close()
    if position == 0:
        raise UserError(f"source '{source}' holds no tokens")
    writer.flush("train" if val_done else "val", position)
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
