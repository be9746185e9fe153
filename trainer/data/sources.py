"""Source specs -> documents (text) or token arrays (existing shards).

Text sources yield one string per document:
  pydoc                     the documentation topics shipped with Python (pydoc_data.topics): offline demo data
  PATH / GLOB               .txt (one document per file), .jsonl / .jsonl.gz (one per line, --text-field),
                            .parquet (one per row, --text-field)
  hf:NAME[:CONFIG][@SPLIT]  a Hugging Face dataset, streamed (never downloads the whole corpus first)
Token sources yield arrays of token ids that are re-sharded and re-validated:
  nanogpt:PATH.bin          nanoGPT's raw uint16 token file
  npy:GLOB                  build-nanogpt's .npy shards
  llmc:GLOB                 llm.c / modded-nanogpt .bin shards (our own format)
"""
import glob
import gzip
import json
from pathlib import Path
from typing import Iterator

import numpy as np

from trainer.errors import UserError, describe

TOKEN_PREFIXES = ("nanogpt:", "npy:", "llmc:")
SPEC_HELP = "pydoc, a file path or glob (.txt/.jsonl/.jsonl.gz/.parquet), hf:NAME[:CONFIG][@SPLIT], " \
            "nanogpt:PATH.bin, npy:GLOB, llmc:GLOB"


def is_token_source(spec: str) -> bool:
    return spec.startswith(TOKEN_PREFIXES)


def source_files(pattern: str) -> list[Path]:
    """The files a path or glob names, sorted (an error when it names none)."""
    paths = sorted(Path(p) for p in glob.glob(str(Path(pattern).expanduser())))
    if not paths:
        raise UserError(f"source '{pattern}': no such file; give an existing path or a glob that matches files")
    return paths


def parse_hf_spec(spec: str) -> tuple[str, str, str]:
    """hf:NAME[:CONFIG][@SPLIT] -> (name, config or None, split)."""
    body = spec[3:]
    split = "train"
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name:
        raise UserError(f"source '{spec}': expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:Skylion007/openwebtext")
    return name, config or None, split


def iter_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    if spec == "pydoc":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
        return
    if spec.startswith("hf:"):
        yield from _iter_hf(spec, text_field)
        return
    if is_token_source(spec):
        raise UserError(f"source '{spec}' holds tokens, not text")
    for path in source_files(spec):
        yield from _iter_file(path, text_field)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            table = pq.ParquetFile(path)
            if text_field not in table.schema_arrow.names:
                columns = ", ".join(table.schema_arrow.names)
                raise UserError(f"{path} has no column '{text_field}' (columns: {columns}); pass --text-field")
            for batch in table.iter_batches(columns=[text_field], batch_size=1024):
                yield from (t for t in batch.column(0).to_pylist() if t)
        elif _is_jsonl(name):
            for number, record in _jsonl_lines(path):
                if not isinstance(record, dict) or text_field not in record:
                    keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                    raise UserError(f"{path} line {number} has no field '{text_field}' (has: {keys}); "
                                    "pass --text-field")
                if record[text_field]:
                    yield str(record[text_field])
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            if text:
                yield text
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}")


def _is_jsonl(name: str) -> bool:
    return name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson"))


def _jsonl_lines(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line of a .jsonl / .jsonl.gz file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {number} is not valid JSON ({e.msg})")


def _open_hf(spec: str):
    import datasets

    name, config, split = parse_hf_spec(spec)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # datasets raises many types (connection, missing config, missing split)
        raise UserError(f"cannot open Hugging Face dataset {name} (config {config}, split {split}): "
                        f"{describe(e, line=0)}")


def _iter_hf(spec: str, text_field: str) -> Iterator[str]:
    name = parse_hf_spec(spec)[0]
    for record in _open_hf(spec):
        if text_field not in record:
            raise UserError(f"dataset {name} has no field '{text_field}' (has: {', '.join(record)}); pass --text-field")
        if record[text_field]:
            yield record[text_field]


def iter_token_arrays(spec: str) -> Iterator[np.ndarray]:
    """Token arrays of an existing tokenized dataset, each validated as it is read."""
    from trainer.data.shards import read_shard

    kind, _, pattern = spec.partition(":")
    for path in source_files(pattern):
        if kind == "nanogpt":
            if path.stat().st_size % 2:
                raise UserError(f"{path} has an odd number of bytes: not a nanoGPT uint16 token file")
            yield np.memmap(path, dtype=np.uint16, mode="r")
        elif kind == "npy":
            try:
                yield np.load(path, mmap_mode="r")
            except (ValueError, OSError) as e:
                raise UserError(f"{path} is not a readable .npy token file ({e})")
        else:
            yield read_shard(path)


def iter_records(spec: str) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of .jsonl / .jsonl.gz / .parquet files (a path or glob) or an
    `hf:NAME[:CONFIG][@SPLIT]` dataset; `where` names the record for error messages ("FILE line 7")."""
    if spec.startswith("hf:"):
        for number, record in enumerate(_open_hf(spec), 1):  # counted from 1, as file lines are
            yield f"{spec} record {number}", record
        return
    if is_token_source(spec) or spec == "pydoc":
        raise UserError(f"source '{spec}' holds no records; give .jsonl / .jsonl.gz / .parquet files or "
                        "hf:NAME[:CONFIG][@SPLIT]")
    for path in source_files(spec):
        name = path.name.lower()
        try:
            if _is_jsonl(name):
                for number, record in _jsonl_lines(path):
                    if not isinstance(record, dict):
                        raise UserError(f"{path} line {number} is a JSON {type(record).__name__}, not an object "
                                        "with named fields")
                    yield f"{path} line {number}", record
            elif name.endswith(".parquet"):
                import pyarrow.parquet as pq

                row = 0
                for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
                    for record in batch.to_pylist():
                        yield f"{path} row {row}", record
                        row += 1
            else:
                raise UserError(f"{path}: records are read from .jsonl, .jsonl.gz or .parquet files")
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}")
