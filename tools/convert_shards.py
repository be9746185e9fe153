"""Make a training dataset: text, jsonl, parquet, a Hugging Face dataset or existing token files -> shards.

    python tools/convert_shards.py --source hf:Skylion007/openwebtext --tokenizer gpt2 --out data/owt --workers 8
    python tools/convert_shards.py --source 'corpus/*.jsonl.gz' --text-field content --tokenizer gpt2 --out data/mine
    python tools/convert_shards.py --source nanogpt:train.bin --tokenizer gpt2 --out data/owt-nanogpt

Rerunning after an interruption resumes; rerunning on a finished dataset does nothing.
"""
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import click

from trainer.data.convert import convert
from trainer.data.sources import SPEC_HELP
from trainer.data.tokenizer import SPEC_HELP as TOKENIZER_HELP


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--source", required=True, help=f"What to convert: {SPEC_HELP}.")
@click.option("--tokenizer", required=True, help=f"Tokenizer spec: {TOKENIZER_HELP}.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Dataset directory to write.")
@click.option("--shard-tokens", default=100_000_000, type=int, help="Tokens per train shard.")
@click.option("--val-tokens", type=int,
              help="Hold out the first documents, this many tokens, for validation (a source of one or a few "
                   "documents: the last N tokens). [default: 5% of the tokens as whole documents, at most 10M]")
@click.option("--workers", default=1, type=int, help="Tokenizer processes (output is identical for any number).")
@click.option("--text-field", default="text", help="Field holding the text in jsonl / parquet / HF datasets.")
@click.option("--json", "json_output", is_flag=True, help="Print meta.json as one JSON line at the end.")
def main(source, tokenizer, out, shard_tokens, val_tokens, workers, text_field, json_output):
    """Tokenize SOURCE into llm.c-format shards (train_*.bin, val_*.bin) plus meta.json."""
    meta = convert(source, tokenizer, out, shard_tokens=shard_tokens, val_tokens=val_tokens, workers=workers,
                   text_field=text_field, progress=True)
    click.echo(f"{out}: {meta['train_tokens']:,} train + {meta['val_tokens_written']:,} val tokens in "
               f"{len(meta['shards'])} shards (tokenizer {tokenizer}, vocab {meta['vocab_size']}; validation: "
               f"{meta['val_rule']})")
    if json_output:
        click.echo(json.dumps(meta))


if __name__ == "__main__":
    main()
