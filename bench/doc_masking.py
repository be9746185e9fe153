"""What --doc-masking does to validation loss, side by side with off, at small scale on this machine.

    nice -n 10 python bench/doc_masking.py            # prints a table
    nice -n 10 python bench/doc_masking.py --json     # ... and one JSON object as the last line

Corpus: Python's pydoc topics cut into paragraphs, one document per paragraph (a few hundred bytes
each), byte-level tokens, 5% of the paragraphs held out: short documents, so most training windows
hold several and the option matters. Two runs of the same model, data order, seed and schedule, one
with --doc-masking and one without. Each final model is then scored on the same validation windows
both ways: masked (every document on its own, as a model scores one document at a time) and
unmasked (a document sees the ones packed before it in its window).
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DATA = REPO / "data" / "pydoc-paragraphs-bytes"


def paragraph_corpus(out: Path = DATA) -> Path:
    from bench.sample_efficiency import byte_shards
    from trainer.data.sources import iter_documents

    paragraphs = (paragraph.strip() for topic in iter_documents("pydoc") for paragraph in topic.split("\n\n"))
    return byte_shards((p for p in paragraphs if len(p) >= 40), out)


def train(data: Path, out: Path, masked: bool, args) -> None:
    cmd = [sys.executable, "-m", "trainer.cli", "pretrain", "--model", args.model, "--data", str(data), "--out",
           str(out), "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--max-steps",
           str(args.steps), "--lr", str(args.lr), "--min-lr", str(args.lr / 10), "--warmup-steps", "20",
           "--eval-every", "0", "--save-every", str(args.steps), "--no-tracking", "--resume", "never",
           "--seed", "1337", "--doc-masking" if masked else "--no-doc-masking"]
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def score(run: Path, dataset, seq_len: int, batches: int) -> dict:
    """Mean validation loss (nats per byte) of the run's final model, masked and unmasked, scored as training
    scores it (trainer/train/validation.py)."""
    import torch

    from trainer.eval.modelio import load_model
    from trainer.train.validation import validation_loss

    model, _, _ = load_model(run)
    val, cpu = dataset.val_stream(seq_len, 8), torch.device("cpu")
    return {"masked": validation_loss(model, val, batches, cpu, dataset.segments),
            "unmasked": validation_loss(model, val, batches, cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gpt2-mini")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--val-batches", type=int, default=40)
    parser.add_argument("--out", default=str(REPO / "runs" / "bench-doc-masking"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from trainer.data.shards import Dataset

    data = paragraph_corpus()
    dataset = Dataset.open(data)
    results = {}
    for masked in (False, True):
        run = Path(args.out) / ("masked" if masked else "unmasked")
        train(data, run, masked, args)
        results["--doc-masking" if masked else "off"] = score(run, dataset, args.seq_len, args.val_batches)
    print(f"{args.model}, seq {args.seq_len}, micro-batch {args.micro_batch}, {args.steps} steps, "
          f"{dataset.train_tokens:,} train tokens of short documents; val loss, nats per byte:")
    print(f"{'trained':<14} {'scored masked':>14} {'scored unmasked':>16}")
    for name, r in results.items():
        print(f"{name:<14} {r['masked']:>14.4f} {r['unmasked']:>16.4f}")
    if args.json:
        print(json.dumps({"config": vars(args), "results": results}))


if __name__ == "__main__":
    main()
