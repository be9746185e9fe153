"""Command line: `python -m trainer.cli COMMAND ...` (also the `gpt-trainer` console script).

Each command only parses options, builds the typed config of its module and calls that module's
`run`. Launchers work unchanged: the deepspeed launcher inserts `--local_rank=N` before the
subcommand, which the group accepts (hidden) and exports as LOCAL_RANK.
"""
import dataclasses
import os

import click

from trainer.config import DEMO_DEFAULTS, FinetuneConfig, TrainConfig
from trainer.optim import SCHEDULES


class _IntOrAuto(click.ParamType):
    name = "N|auto"

    def convert(self, value, param, ctx):
        if value == "auto" or isinstance(value, int):
            return value
        try:
            return int(value)
        except ValueError:
            self.fail(f"{value!r} is not an integer or auto", param, ctx)


INT_OR_AUTO = _IntOrAuto()


def trust_option(command):
    """`--trust-checkpoints`, on the commands that read checkpoints (this group, tools/zero_to_fp32.py)."""
    def trust(context, param, value):
        if value:
            from trainer.checkpoint import safe_load

            safe_load.trust()

    return click.option("--trust-checkpoints", is_flag=True, expose_value=False, is_eager=True, callback=trust,
                        help="Load checkpoint files with full pickle, which runs any code they carry: only for files "
                             "from a source you trust. [default: tensors and the types DeepSpeed saves only]")(command)


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


# ---- commands are registered below, one block each -------------------------------------------


def _given(**options) -> dict:
    """Only the options the user actually passed, so YAML values are not overwritten by defaults."""
    return {k: v for k, v in options.items() if v is not None and v != ()}


def _default_of(name: str, cls=TrainConfig) -> str:
    """` [default: X]` from the config class itself (and, for pretrain, the demo's value where it differs)."""
    value = next(f.default for f in dataclasses.fields(cls) if f.name == name)
    shown = {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    demo = DEMO_DEFAULTS.get(name) if cls is TrainConfig else None
    return f" [default: {shown}" + (f"; the demo: {demo}" if demo not in (None, value) else "") + "]"


def training_options(cls=TrainConfig, exclude=()):
    """A decorator adding the run options (`cls` fields: TrainConfig for pretrain, FinetuneConfig for finetune,
    with that class's defaults in the help), less the `exclude`d ones; a flag overrides the --config YAML."""
    def _default(name: str) -> str:
        return _default_of(name, cls)

    options = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="YAML run config; flags override it."),
        click.option("--model", help="Model preset (gpt2, gpt2-medium, gpt25, tiny, ...)." + _default("model")),
        click.option("--set", "set_", multiple=True, metavar="KEY=VALUE",
                     help="Override a model config field (repeatable)."),
        click.option("--data", type=click.Path(),
                     help="Dataset dir from tools/convert_shards.py. [default: the pydoc demo data]"),
        click.option("--tokenizer", help="Tokenizer for the demo data only (gpt2, bytes, hf:PATH, sp:PATH)."),
        click.option("--out", help="Run directory." + _default("out")),
        click.option("--ds-config",
                     help="DeepSpeed JSON (path or name in ds_configs/), or auto." + _default("ds_config")),
        click.option("--init-from", help="Start from a consolidated model dir, HF model dir or hub name."),
        click.option("--seq-len", type=int, help="Sequence length. [default: the model's block_size; the demo: 256]"),
        click.option("--micro-batch", type=INT_OR_AUTO,
                     help="Sequences per rank per forward pass, or auto: the largest the memory estimate fits on "
                          "the GPUs, the global batch kept by accumulation." + _default("micro_batch")),
        click.option("--grad-accum", type=int,
                     help="Micro-batches per optimizer step. [default: from the global batch, else 1]"),
        click.option("--global-batch", type=int, help="Sequences per optimizer step over all ranks."),
        click.option("--global-batch-tokens", type=int, help="Tokens per optimizer step over all ranks."),
        click.option("--max-steps", type=int, help="Stop after this many optimizer steps."),
        click.option("--max-tokens", type=int, help="Stop after this many training tokens."),
        click.option("--epochs", type=float, help="Stop after this many passes over the training shards. [default: 1]"),
        click.option("--max-time", help="Wall-clock budget, e.g. 24h or 90m: save and stop before it ends."),
        click.option("--stop-after-steps", type=click.IntRange(min=1),
                     help="Pause: save and exit after N steps of this invocation; the LR schedule still spans "
                          "the whole run."),
        click.option("--lr", type=float, help="Peak learning rate." + _default("lr")),
        click.option("--min-lr", type=float, help="Final learning rate." + _default("min_lr")),
        click.option("--warmup-steps", type=int, help="Linear warmup steps." + _default("warmup_steps")),
        click.option("--schedule", type=click.Choice(SCHEDULES), help="LR schedule." + _default("schedule")),
        click.option("--weight-decay", type=float,
                     help="AdamW weight decay on 2-D weights." + _default("weight_decay")),
        click.option("--beta1", type=float, help="Adam beta1." + _default("beta1")),
        click.option("--beta2", type=float, help="Adam beta2." + _default("beta2")),
        click.option("--eps", type=float, help="Adam epsilon." + _default("eps")),
        click.option("--grad-clip", type=float,
                     help="Clip the global gradient norm (0 = off). [default: 1.0; off with Muon under ZeRO-1/2/3, "
                          "where DeepSpeed would clip Muon's update]"),
        click.option("--muon-lr", type=float,
                     help="Muon's peak rate (Muon ds-configs; --lr is then the AdamW rate)." + _default("muon_lr")),
        click.option("--muon-momentum", type=float, help="Muon's momentum." + _default("muon_momentum")),
        click.option("--muon-weight-decay", type=float,
                     help="Muon's decoupled weight decay." + _default("muon_weight_decay")),
        click.option("--seed", type=int, help="Seed for weights and data order." + _default("seed")),
        click.option("--activation-checkpointing/--no-activation-checkpointing", default=None,
                     help="Recompute block activations in backward to save memory."
                          + _default("activation_checkpointing")),
        click.option("--doc-masking/--no-doc-masking", default=None,
                     help="In packed windows, attend only within each document (positions restart at each one)."
                          + _default("doc_masking")),
        click.option("--deterministic/--no-deterministic", default=None,
                     help="Bitwise repeatable steps on GPUs too (deterministic kernels, slower); an op without one "
                          "is an error." + _default("deterministic")),
        click.option("--compile/--no-compile", "compile_", default=None,
                     help="torch.compile the model (if it cannot compile, the run says so and trains eagerly). "
                          "[default: on for CUDA GPUs, off on CPUs]"),
        click.option("--max-skips", type=int,
                     help="Roll back after this many consecutive non-finite steps." + _default("max_skips")),
        click.option("--max-rollbacks", type=click.IntRange(min=0),
                     help="Reload the last checkpoint and skip the bad data at most N times, then stop."
                          + _default("max_rollbacks")),
        click.option("--eval-every", type=int,
                     help="Validation loss every N steps and at the end (0 = never)." + _default("eval_every")),
        click.option("--eval-batches", type=int, help="Validation batches per evaluation." + _default("eval_batches")),
        click.option("--save-every", type=int,
                     help="Checkpoint every N steps (and always at the end)." + _default("save_every")),
        click.option("--keep-last", type=int,
                     help="Keep only the newest K complete checkpoints (0 = all)." + _default("keep_last")),
        click.option("--log-every", type=int, help="Log metrics every N steps." + _default("log_every")),
        click.option("--resume",
                     help="auto (newest complete checkpoint in --out), never, or a checkpoint PATH."
                          + _default("resume")),
        click.option("--hellaswag-every", type=int, help="Run HellaSwag every N steps (needs --hellaswag-jsonl)."),
        click.option("--hellaswag-jsonl", type=click.Path(), help="HellaSwag validation jsonl for --hellaswag-every."),
        click.option("--wandb-project",
                     help="Also log to Weights & Biases (WANDB_MODE=offline works without network)."),
        click.option("--tracking/--no-tracking", default=None,
                     help="TensorBoard / W&B logging." + _default("tracking")),
        click.option("--json", "json_output", is_flag=True, help="Print the final result as one JSON line."),
    ]

    def decorate(command):
        for option in reversed(options):
            if _option_name(option) not in exclude:
                command = option(command)
        return command
    return decorate


def _option_name(option) -> str:
    """The parameter name a click.option decorator declares."""
    def probe():
        pass
    return option(probe).__click_params__[-1].name


def resolve_training_config(config_file, set_, compile_, options, cls=TrainConfig) -> "TrainConfig":
    """Defaults of `cls` < YAML < the flags given."""
    from trainer import config as train_config

    flags = _given(**options, compile=compile_)
    if set_:
        flags["model_overrides"] = train_config.parse_set(set_)
    return train_config.resolve(config_file, flags, cls=cls)


@cli.command(context_settings={"show_default": True})
@training_options()
def pretrain(config_file, set_, compile_, json_output, **options):
    """Pretrain a GPT-2 / GPT-2.5 model with DeepSpeed.

    With no options: the offline demo (pydoc corpus, gpt2-mini, ZeRO-2), about a minute on a CPU.
    Launch on GPUs with `deepspeed --num_gpus N --module trainer.cli pretrain ...`,
    `torchrun --nproc_per_node N -m trainer.cli pretrain ...`, or plain `python -m trainer.cli pretrain`.
    """
    cfg = resolve_training_config(config_file, set_, compile_, options)
    from trainer import pretrain as pretrain_module  # heavy imports only once the options are valid

    pretrain_module.run(cfg, json_output=json_output)


# ---- finetune: pretrain's options (less those that pick data and model) plus its own --------------

@cli.command(context_settings={"show_default": True})
@click.option("--init-from", help="The pretrained model: run dir, checkpoint, consolidated or HF model dir, hub name.")
@click.option("--data", help="Instruction data: .jsonl / .jsonl.gz / .parquet (or a glob), hf:NAME[:CONFIG][@SPLIT], "
                             "or a dir of tokenized examples (a run's RUN/sft).")
@click.option("--format", "sft_format", type=click.Choice(["auto", "alpaca", "chat", "prompt-completion"]),
              help="Record layout: alpaca (instruction/input/output), chat (messages), prompt-completion."
                   + _default_of("sft_format", FinetuneConfig))
@click.option("--template", help="Chat template: plain, chatml, alpaca, or a JSON file."
                                 + _default_of("template", FinetuneConfig))
@click.option("--max-seq-len", "seq_len", type=int,
              help="Training window and longest example; longer ones are truncated (counted). "
                   "[default: the model's block_size]")
@click.option("--packing/--no-packing", default=None,
              help="Pack examples into windows, or one padded example each." + _default_of("packing", FinetuneConfig))
@click.option("--val-fraction", type=float,
              help="Fraction of records held out for val loss." + _default_of("val_fraction", FinetuneConfig))
@click.option("--tokenizer", help="Tokenizer spec, only for a base model that records none.")
@training_options(FinetuneConfig, exclude=("model", "data", "tokenizer", "init_from", "seq_len"))
def finetune(config_file, set_, compile_, json_output, **options):
    """Instruction-tune a pretrained model: loss on the responses only, same engine, checkpoints and resume as pretrain.

    Launch as pretrain: plain python, `deepspeed --num_gpus N --module trainer.cli finetune ...` or torchrun.
    Some defaults differ from pretrain's (a smaller lr, no weight decay, ...): the options show them.
    """
    cfg = resolve_training_config(config_file, set_, compile_, options, cls=FinetuneConfig)
    from trainer import finetune as finetune_module  # heavy imports only once the options are valid

    finetune_module.run(cfg, json_output=json_output)


@cli.command("estimate-memory", context_settings={"show_default": True})
@click.option("--model", default="gpt2-medium", help="Model preset (gpt2, gpt2-medium, gpt25-medium, ...).")
@click.option("--set", "set_", multiple=True, metavar="KEY=VALUE", help="Override a model config field (repeatable).")
@click.option("--ds-config", default="zero2_bf16",
              help="DeepSpeed JSON (path or name in ds_configs/): stage, precision, offload, buckets.")
@click.option("--gpus", type=int, default=1, help="Data-parallel GPUs (ZeRO partitions over them).")
@click.option("--micro-batch", type=int, default=8, help="Sequences per GPU per forward pass.")
@click.option("--seq-len", type=int, default=None, help="Tokens per sequence. [default: the model's block_size]")
@click.option("--activation-checkpointing/--no-activation-checkpointing", default=False,
              help="Recompute block activations in backward.")
@click.option("--gpu-memory", type=float, default=24.0, help="Memory per GPU in GB (2**30 bytes).")
@click.option("--table", "show_table", is_flag=True, help="Print the recommendation table for common models and GPUs.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")
def estimate_memory(set_, gpu_memory, **options):
    """Predict per-GPU memory (and the largest micro-batch that fits) before launching a run."""
    from trainer import memory
    from trainer.config import parse_set

    memory.run(overrides=parse_set(set_), gpu_memory_gb=gpu_memory, **options)


@cli.command(context_settings={"show_default": True})
@click.option("--build-ops", is_flag=True,
              help="Build DeepSpeed's C++/CUDA ops that configs here use (about a minute each, once).")
@click.option("--ds-config", default="auto", help="The DeepSpeed config you will run: its problems are failures.")
@click.option("--out", default="runs", help="Where checkpoints will go (free disk is checked there).")
@click.option("--model", default="gpt2-medium", help="Model preset whose checkpoint size the disk check uses.")
@click.option("--keep-last", type=int, default=3, help="Checkpoints kept (as pretrain --keep-last).")
@click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")
def doctor(**options):
    """Pre-flight check: versions, GPUs, bf16, which optimizer runs and what it must build, free disk; each
    problem with its fix."""
    from trainer import doctor as doctor_module

    doctor_module.run(**options)


_MODEL_PATH_HELP = ("Run dir (latest complete checkpoint), checkpoint dir or RUN/step_N, consolidated model dir, "
                    "HF model dir or hub name (e.g. gpt2).")


def compute_options(command):
    """--dtype, --device, --tokenizer: how an inference command runs the model it loads."""
    for option in reversed([
            click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
                         help="Compute dtype. [default: bfloat16 on GPU, float32 on CPU]"),
            click.option("--device", help="cpu, cuda, cuda:1 ... [default: this rank's GPU, else cpu]"),
            click.option("--tokenizer", help="Tokenizer spec, when the model path records none (gpt2, bytes, "
                                              "hf:PATH, sp:PATH).")]):
        command = option(command)
    return command


@cli.command("eval-ppl", context_settings={"show_default": True})
@click.option("--model-path", required=True, help=_MODEL_PATH_HELP)
@click.option("--data", type=click.Path(), help="Dataset dir: score its val_*.bin shards.")
@click.option("--text-file", type=click.Path(), help="Score a UTF-8 text file.")
@click.option("--hf-dataset", help="HF dataset name or local dir (wikitext: config wikitext-103-raw-v1 by default).")
@click.option("--hf-config", help="HF dataset config.")
@click.option("--split", default="test", help="HF dataset split.")
@click.option("--text-column", default="text", help="HF dataset text column (documents joined with blank lines).")
@click.option("--context", type=int, help="Tokens the model sees per window. [default: the model's block size]")
@click.option("--stride", type=int,
              help="New tokens scored per window (= context: lm-eval's rolling loglikelihood). [default: context/2]")
@click.option("--batch-size", type=int, default=8, help="Windows per forward pass (does not change the result).")
@compute_options
@click.option("--max-tokens", type=int, help="Score only the first N tokens (quick checks).")
@click.option("--word-level", is_flag=True, help="Also report word-level perplexity (GPT-2 paper style).")
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")
def eval_ppl(json_output, **options):
    """Perplexity with a strided sliding window, plus bits per byte: every token scored once, the first
    conditioned on end-of-text (as lm-eval's rolling loglikelihood).

    Data-parallel under `deepspeed --module trainer.cli eval-ppl ...` or torchrun, same result as 1 rank.
    """
    from trainer import evaluate

    evaluate.run_ppl(evaluate.PplConfig(**options), json_output=json_output)


@cli.command("eval-hellaswag", context_settings={"show_default": True})
@click.option("--model-path", required=True, help=_MODEL_PATH_HELP)
@click.option("--jsonl", required=True, type=click.Path(),
              help="HellaSwag jsonl (ctx, endings, label), e.g. hellaswag_val.jsonl from github.com/rowanz/hellaswag.")
@click.option("--limit", type=int, help="Score only the first N examples.")
@compute_options
@click.option("--progress/--no-progress", default=True, help="Progress bar on stderr.")
@click.option("--json", "json_output", is_flag=True, help="Print the result as one JSON line.")
def eval_hellaswag(**options):
    """HellaSwag accuracy, completion style: lowest loss over the ending wins (acc: summed, acc_norm: per token)."""
    from trainer import evaluate

    evaluate.run_hellaswag(**options)


@cli.command("eval-harness", context_settings={"show_default": True})
@click.option("--model-path", required=True, help=_MODEL_PATH_HELP)
@click.option("--tasks", required=True,
              help="Comma-separated lm-evaluation-harness tasks, e.g. hellaswag,lambada_openai,arc_easy,piqa,wikitext.")
@click.option("--limit", type=int, help="Score only the first N examples of each task.")
@click.option("--num-fewshot", type=int, help="Few-shot examples per prompt. [default: each task's own]")
@click.option("--batch-size", type=int, default=8, help="Requests per forward pass (padded to the longest).")
@click.option("--include-path", type=click.Path(),
              help="Directory of your own task YAMLs (e.g. over local jsonl files).")
@click.option("--max-gen-toks", type=int, default=256, help="Generation length for tasks that do not set one.")
@click.option("--seed", type=int, default=1234, help="Seed for tasks that sample (do_sample); request i uses seed + i.")
@compute_options
@click.option("--progress/--no-progress", default=True, help="Progress bars on stderr.")
@click.option("--json", "json_output", is_flag=True, help="Print the results as one JSON line.")
def eval_harness(json_output, **options):
    """Standard benchmarks with lm-evaluation-harness (pip install -e ".[eval]"), our model in process.

    Data-parallel under `deepspeed --module trainer.cli eval-harness ...` or torchrun, same numbers as 1 rank.
    """
    from trainer import harness

    harness.run(harness.HarnessConfig(**options), json_output=json_output)


@cli.command(context_settings={"show_default": True})
@click.option("--model-path", required=True, help=_MODEL_PATH_HELP)
@click.option("--prompt", default="", help="Text to continue (empty: start from end-of-text).")
@click.option("--max-new-tokens", type=int, default=200, help="Tokens to generate per sample.")
@click.option("--temperature", type=float, default=1.0, help="Sampling temperature (0 = greedy).")
@click.option("--top-k", type=int, help="Sample from the k most likely tokens only (0 = off).")
@click.option("--top-p", type=float, help="Nucleus sampling: smallest set with probability >= p.")
@click.option("--num-samples", type=int, default=1, help="Independent samples (sample i uses seed + i).")
@click.option("--seed", type=int, default=1337, help="Random seed.")
@compute_options
@click.option("--cache/--no-cache", "use_cache", default=True, help="Use the KV cache.")
@click.option("--stop-at-eot/--no-stop-at-eot", default=True, help="Stop a sample at end-of-text.")
@click.option("--chat", is_flag=True,
              help="Apply the fine-tuned model's chat template to --prompt; stop at its end marker.")
@click.option("--template", help="Chat template to apply (plain, chatml, alpaca or a JSON file); implies --chat.")
@click.option("--system", help="A system message before --prompt (with --chat).")
@click.option("--json", "json_output", is_flag=True, help="Print {prompt, samples} as one JSON line (no streaming).")
def generate(json_output, **options):
    """Sample text from a model, streamed to stdout."""
    from trainer import generate as generate_module

    generate_module.run(generate_module.GenerateConfig(**options), json_output=json_output)


@cli.command(context_settings={"show_default": True})
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", default="curves.png", help="Image to write (.png, .pdf, .svg).")
@click.option("--x", "x", type=click.Choice(["step", "tokens"]), default="step",
              help="x axis: optimizer steps, or tokens seen (compares runs with different batch sizes).")
@click.option("--json", "json_output", is_flag=True, help="Print {out, runs, panels} as one JSON line.")
def plot(runs, **options):
    """Loss, val loss, lr and throughput curves of one or several runs side by side."""
    from trainer import plot as plot_module

    plot_module.run(list(runs), **options)


if __name__ == "__main__":
    cli()
