"""Command line: `python -m trainer.cli COMMAND ...` (also the `gpt-trainer` console script).

Each command only parses options, builds the typed config of its module and calls that module's
`run`. Launchers work unchanged: the deepspeed launcher inserts `--local_rank=N` before the
subcommand, which the group accepts (hidden) and exports as LOCAL_RANK.
"""
import os

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher.")
def cli(local_rank):
    """Pretrain GPT-2 / GPT-2.5 models with DeepSpeed, evaluate them, export them to Hugging Face.

    Start with `pretrain` (no options: a few-minute offline demo on CPU), then `eval-ppl`,
    `generate`, and `python tools/zero_to_fp32.py RUN OUT --hf`.
    """
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)


# ---- commands are registered below, one block each -------------------------------------------


if __name__ == "__main__":
    cli()
