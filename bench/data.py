"""Data pipeline figures: conversion MB/s per worker (GPT-2 BPE) and loader tokens/s.

    python bench/data.py [--mb 20] [--workers 1,2] [--json]

The corpus is Python's pydoc topics repeated to --mb megabytes (a jsonl file in a temp dir), so
the benchmark runs offline anywhere. Figures print as a table; --json prints one JSON line.
"""
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click

from trainer.data.convert import convert
from trainer.data.shards import Dataset, TrainStream
from trainer.data.sources import iter_documents


def make_corpus(directory: Path, megabytes: float) -> tuple[Path, int]:
    docs = list(iter_documents("pydoc"))
    path = directory / "corpus.jsonl"
    size = 0
    with open(path, "w") as f:
        while size < megabytes * 1e6:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
                size += len(doc.encode())
    return path, size


def loader_tokens_per_s(dataset_dir: Path, seq_len=1024, global_batch=64, seconds=3.0) -> float:
    stream = TrainStream(Dataset.open(dataset_dir), seq_len, global_batch, seed=0)
    tokens, cursor, start = 0, 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        x, _ = stream.local_batch(cursor, 0, 1)
        cursor += global_batch
        tokens += x.numel()
    return tokens / (time.perf_counter() - start)


@click.command()
@click.option("--mb", default=20.0, help="Corpus size in MB of text.")
@click.option("--workers", default="1,2", help="Comma-separated worker counts to time.")
@click.option("--json", "json_output", is_flag=True)
def main(mb, workers, json_output):
    results = {"text_mb": None, "convert": [], "loader_tokens_per_s": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus, size = make_corpus(tmp, mb)
        results["text_mb"] = size / 1e6
        for n in [int(w) for w in workers.split(",")]:
            start = time.perf_counter()
            meta = convert(str(corpus), "gpt2", tmp / f"out{n}", shard_tokens=2_000_000, val_tokens=100_000,
                           workers=n, progress=False)
            seconds = time.perf_counter() - start
            tokens = meta["train_tokens"] + meta["val_tokens_written"]
            results["convert"].append({"workers": n, "seconds": seconds, "mb_per_s": size / 1e6 / seconds,
                                       "mb_per_s_per_worker": size / 1e6 / seconds / n,
                                       "tokens_per_s": tokens / seconds})
        results["loader_tokens_per_s"] = loader_tokens_per_s(tmp / f"out{workers.split(',')[0]}")
    print(f"corpus: {results['text_mb']:.1f} MB of text, GPT-2 BPE")
    print(f"{'workers':>8} {'seconds':>8} {'MB/s':>8} {'MB/s/worker':>12} {'tokens/s':>12}")
    for r in results["convert"]:
        print(f"{r['workers']:>8} {r['seconds']:>8.2f} {r['mb_per_s']:>8.2f} {r['mb_per_s_per_worker']:>12.2f} "
              f"{r['tokens_per_s']:>12,.0f}")
    print(f"loader: {results['loader_tokens_per_s']:,.0f} tokens/s (seq 1024, global batch 64, one process)")
    if json_output:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
