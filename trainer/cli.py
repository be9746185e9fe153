"""Command line: `python -m trainer.cli COMMAND ...` (also the `gpt-trainer` console script).

Each command only parses options (made from its config dataclass in trainer/config.py by
trainer/options.py), builds that config and calls its module's `run`. Heavy modules are imported only
once the options are valid. Launchers work unchanged: the deepspeed launcher inserts `--local_rank=N`
before the subcommand, which the group accepts (hidden) and exports as LOCAL_RANK.
"""
import os

import click

from trainer import config
from trainer.options import config_options, given, json_option, set_option, trust_option

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True,
              help="Set by the deepspeed launcher.")
@trust_option
def cli(local_rank):
    """Pretrain GPT-2 / GPT-2.5 models with DeepSpeed, evaluate them, export them to Hugging Face.

    Start with `pretrain` (no options: a one-minute offline demo on CPU), then `eval-ppl`,
    `eval-harness`, `generate`, and `python tools/zero_to_fp32.py RUN OUT --hf`.
    """
    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)


def run_options(cls, exclude=()):
    """A run's options: --config YAML, --set, every field of `cls`, --json."""
    def decorate(command):
        command = config_options(cls, exclude)(json_option(command))
        command = set_option(command)
        return click.option("--config", "config_file", type=click.Path(dir_okay=False),
                            help="YAML run config; flags override it.")(command)
    return decorate


def resolve_run(config_file, set_, options, cls) -> config.TrainConfig:
    """Defaults of `cls` < YAML < the flags given."""
    flags = given(options)
    if set_:
        flags["model_overrides"] = config.parse_set(set_)
    return config.resolve(config_file, flags, cls=cls)


@cli.command()
@run_options(config.TrainConfig)
def pretrain(config_file, set_, json_output, **options):
    """Pretrain a GPT-2 / GPT-2.5 model with DeepSpeed.

    With no options: the offline demo (pydoc corpus, gpt2-mini, ZeRO-2), under a minute on a CPU.
    Launch on GPUs with `deepspeed --num_gpus N --module trainer.cli pretrain ...`,
    `torchrun --nproc_per_node N -m trainer.cli pretrain ...`, or plain `python -m trainer.cli pretrain`.
    """
    cfg = resolve_run(config_file, set_, options, config.TrainConfig)
    from trainer.train import pretrain as pretrain_module

    pretrain_module.run(cfg, json_output=json_output)


@cli.command()
@run_options(config.FinetuneConfig)
def finetune(config_file, set_, json_output, **options):
    """Instruction-tune a pretrained model: loss on the responses only, same engine, checkpoints and resume as pretrain.

    Launch as pretrain: plain python, `deepspeed --num_gpus N --module trainer.cli finetune ...` or torchrun.
    Some defaults differ from pretrain's (a smaller lr, no weight decay, ...): the options show them.
    """
    cfg = resolve_run(config_file, set_, options, config.FinetuneConfig)
    from trainer.sft import finetune as finetune_module

    finetune_module.run(cfg, json_output=json_output)


@cli.command("estimate-memory")
@config_options(config.EstimateConfig)
@set_option
@json_option
def estimate_memory(set_, json_output, **options):
    """Predict per-GPU memory (and the largest micro-batch that fits) before launching a run."""
    from trainer import memory

    memory.run(config.EstimateConfig(**given(options), model_overrides=config.parse_set(set_)), json_output)


@cli.command()
@config_options(config.DoctorConfig)
@json_option
def doctor(json_output, **options):
    """Pre-flight check: versions, GPUs, bf16, which optimizer runs and what it must build, free disk; each
    problem with its fix."""
    from trainer.engine import doctor as doctor_module

    doctor_module.run(config.DoctorConfig(**given(options)), json_output)


@cli.command("eval-ppl")
@config_options(config.PplConfig)
@json_option
def eval_ppl(json_output, **options):
    """Perplexity with a strided sliding window, plus bits per byte: every token scored once, the first
    conditioned on end-of-text (as lm-eval's rolling loglikelihood).

    Data-parallel under `deepspeed --module trainer.cli eval-ppl ...` or torchrun, same result as 1 rank.
    """
    from trainer.eval import evaluate

    evaluate.run_ppl(config.PplConfig(**given(options)), json_output=json_output)


@cli.command("eval-hellaswag")
@config_options(config.HellaSwagConfig)
@json_option
def eval_hellaswag(json_output, **options):
    """HellaSwag accuracy, completion style: lowest loss over the ending wins (acc: summed, acc_norm: per token)."""
    from trainer.eval import evaluate

    evaluate.run_hellaswag(config.HellaSwagConfig(**given(options)), json_output=json_output)


@cli.command("eval-harness")
@config_options(config.HarnessConfig)
@json_option
def eval_harness(json_output, **options):
    """Standard benchmarks with lm-evaluation-harness (pip install -e ".[eval]"), our model in process.

    Data-parallel under `deepspeed --module trainer.cli eval-harness ...` or torchrun, same numbers as 1 rank.
    """
    from trainer.eval import harness

    harness.run(config.HarnessConfig(**given(options)), json_output=json_output)


@cli.command()
@config_options(config.GenerateConfig)
@json_option
def generate(json_output, **options):
    """Sample text from a model, streamed to stdout (with --json: {prompt, samples} as one line, no streaming)."""
    from trainer.eval import generate as generate_module

    generate_module.run(config.GenerateConfig(**given(options)), json_output=json_output)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@config_options(config.PlotConfig)
@json_option
def plot(runs, json_output, **options):
    """Loss, val loss, lr and throughput curves of one or several runs side by side."""
    from trainer import plot as plot_module

    plot_module.run(config.PlotConfig(runs=tuple(runs), **given(options)), json_output=json_output)


if __name__ == "__main__":
    cli()
