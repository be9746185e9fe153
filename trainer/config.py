"""Every command's settings, declared once: the dataclasses below are what the commands run with, and
each field's `help` (with its flag, choices and type) is what `trainer/options.py` turns into the
command-line option. Nothing else declares an option or repeats a default.

TrainConfig is everything about a run that is not architecture (ModelConfig) or ZeRO (ds_configs). A
run config comes from, in order of precedence: command-line flags, a YAML file (`--config`), then these
defaults. The resolved config is written to RUN/config.yaml and stored in every checkpoint. Unknown
YAML keys are errors that list the valid ones, so a typo never goes unnoticed.
"""
import dataclasses
import re
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from trainer.errors import UserError
from trainer.fileio import atomic_write_text
from trainer.train.optim import SCHEDULES

DEMO_MODEL = "gpt2-mini"
DEMO_OUT = "runs/demo"
# When no --data is given the run is the offline demo: short enough for a laptop CPU, long enough for the
# loss to fall clearly. Only options the user did not set take these values.
DEMO_DEFAULTS = dict(max_steps=200, micro_batch=8, seq_len=256, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                     eval_every=50, eval_batches=8, save_every=100, log_every=10)


def option(default=MISSING, help: str = "", **cli):
    """A config field that is also a command-line option: `help`, and in `cli` any of flag (another spelling),
    choices, min (an integer's least value), metavar, shown (the default as the help states it), is_flag (a
    bool without --no-), int_or_auto, path. A field with no help is not on the command line."""
    metadata = {"help": help, **cli} if help else {}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


MODEL_PATH = ("Run dir (latest complete checkpoint), checkpoint dir or RUN/step_N, consolidated model dir, HF model "
              "dir or hub name (e.g. gpt2).")


@dataclass(kw_only=True)
class TrainConfig:
    # what to train
    model: Optional[str] = option(DEMO_MODEL, "Model preset (gpt2, gpt2-medium, gpt25, tiny, ...).")
    model_overrides: dict = option({})           # --set KEY=VALUE (trainer/options.py)
    data: Optional[str] = option(None, "Dataset dir from tools/convert_shards.py.", path=True,
                                 shown="the pydoc demo data")
    tokenizer: Optional[str] = option(None, "Tokenizer for the demo data only (gpt2, bytes, hf:PATH, sp:PATH).")
    out: str = option(DEMO_OUT, "Run directory.")
    ds_config: str = option("auto", "DeepSpeed JSON (path or name in ds_configs/), or auto (ZeRO-2 in the fastest "
                            "precision this machine has).")
    init_from: Optional[str] = option(None, "Start from a consolidated model dir, HF model dir or hub name.")
    # batch
    seq_len: Optional[int] = option(None, "Sequence length.", shown="the model's block_size")
    micro_batch: Union[int, str] = option(8, "Sequences per rank per forward pass, or auto: the largest the memory "
                                          "estimate fits on the GPUs, the global batch kept by accumulation.",
                                          int_or_auto=True)
    grad_accum: Optional[int] = option(None, "Micro-batches per optimizer step.", shown="from the global batch, else 1")
    global_batch: Optional[int] = option(None, "Sequences per optimizer step over all ranks.")
    global_batch_tokens: Optional[int] = option(None, "Tokens per optimizer step over all ranks.")
    # length
    max_steps: Optional[int] = option(None, "Stop after this many optimizer steps.")
    max_tokens: Optional[int] = option(None, "Stop after this many training tokens.")
    epochs: Optional[float] = option(None, "Stop after this many passes over the training data.", shown="1")
    max_time: Optional[str] = option(None, "Wall-clock budget, e.g. 24h or 90m: save and stop before it ends.")
    stop_after_steps: Optional[int] = option(None, "Pause: save and exit after N steps of this invocation; the LR "
                                             "schedule still spans the whole run.", min=1)
    # optimisation
    lr: float = option(6e-4, "Peak learning rate.")
    min_lr: float = option(6e-5, "Final learning rate.")
    warmup_steps: int = option(100, "Linear warmup steps.")
    schedule: str = option("cosine", "LR schedule.", choices=SCHEDULES)
    decay_frac: float = option(0.2, "wsd schedule: the fraction of steps spent decaying.")
    weight_decay: float = option(0.1, "AdamW weight decay on 2-D weights.")
    beta1: float = option(0.9, "Adam beta1.")
    beta2: float = option(0.95, "Adam beta2.")
    eps: float = option(1e-8, "Adam epsilon.")
    grad_clip: Optional[float] = option(None, "Clip the global gradient norm (0 = off).",
                                        shown="1.0; off with Muon under ZeRO-1/2/3, where DeepSpeed would clip "
                                              "Muon's update")
    # Muon (a ds_configs JSON with "type": "Muon"): the blocks' hidden matrices; the rest stays on AdamW (lr above)
    muon_lr: float = option(0.02, "Muon's peak rate (Muon ds-configs; --lr is then the AdamW rate).")
    muon_momentum: float = option(0.95, "Muon's momentum.")
    muon_weight_decay: float = option(0.0, "Muon's decoupled weight decay (p *= 1 - muon_lr * muon_weight_decay).")
    seed: int = option(1337, "Seed for weights and data order.")
    activation_checkpointing: bool = option(False, "Recompute block activations in backward to save memory.")
    doc_masking: bool = option(False, "In packed windows, attend only within each document (positions restart at "
                               "each one).")
    deterministic: bool = option(False, "Bitwise repeatable steps on GPUs too (deterministic kernels, slower); an op "
                                 "without one is an error.")
    compile: Optional[bool] = option(None, "torch.compile the model (if it cannot compile, the run says so and trains "
                                     "eagerly).", shown="on for CUDA GPUs unless --deterministic, off on CPUs")
    max_skips: int = option(10, "Roll back after this many consecutive non-finite steps.")
    max_rollbacks: int = option(3, "Reload the last checkpoint and skip the bad data at most N times, then stop.",
                                min=0)
    # cadence
    eval_every: int = option(250, "Validation loss every N steps and at the end (0 = never).")
    eval_batches: int = option(20, "Validation batches per evaluation.")
    save_every: int = option(1000, "Checkpoint every N steps (and always at the end).")
    keep_last: int = option(3, "Keep only the newest K complete checkpoints (0 = all).")
    log_every: int = option(10, "Log metrics every N steps.")
    resume: str = option("auto", "auto (newest complete checkpoint in --out), never, or a checkpoint PATH.")
    hellaswag_every: int = option(0, "Run HellaSwag every N steps (needs --hellaswag-jsonl).", shown="never")
    hellaswag_jsonl: Optional[str] = option(None, "HellaSwag validation jsonl for --hellaswag-every.", path=True)
    # tracking
    tracking: bool = option(True, "TensorBoard / W&B logging.")
    wandb_project: Optional[str] = option(None, "Also log to Weights & Biases (WANDB_MODE=offline works without "
                                          "network).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown run config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
        return cls(**values)


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """A `finetune` run: a TrainConfig with fine-tuning defaults (a small learning rate, no weight decay,
    one epoch) plus the instruction data's settings (trainer/sft/). The architecture is
    --init-from's, so there is no preset; `seq_len` is --max-seq-len: the training window and the longest
    example; `tokenizer` names the base model's tokenizer when it records none."""
    model: Optional[str] = None                  # the architecture comes from init_from
    init_from: Optional[str] = option(None, "The pretrained model: run dir, checkpoint, consolidated or HF model dir, "
                                      "hub name.")
    data: Optional[str] = option(None, "Instruction data: .jsonl / .jsonl.gz / .parquet (or a glob), "
                                 "hf:NAME[:CONFIG][@SPLIT], or a dir of tokenized examples (a run's RUN/sft).")
    tokenizer: Optional[str] = option(None, "Tokenizer spec, only for a base model that records none.")
    seq_len: Optional[int] = option(None, "Training window and longest example; longer ones are truncated (counted).",
                                    flag="--max-seq-len", shown="the model's block_size")
    out: str = option("runs/finetune", "Run directory.")
    lr: float = option(2e-5, "Peak learning rate.")
    min_lr: float = option(2e-6, "Final learning rate.")
    warmup_steps: int = option(20, "Linear warmup steps.")
    weight_decay: float = option(0.0, "AdamW weight decay on 2-D weights.")
    eval_every: int = option(100, "Validation loss every N steps and at the end (0 = never).")
    save_every: int = option(500, "Checkpoint every N steps (and always at the end).")
    sft_format: str = option("auto", "Record layout: alpaca (instruction/input/output), chat (messages), "
                             "prompt-completion.", flag="--format",
                             choices=("auto", "alpaca", "chat", "prompt-completion"))
    template: str = option("plain", "Chat template: plain, chatml, alpaca, or a JSON file (trainer/sft/template.py).")
    packing: bool = option(True, "Pack examples into windows, or one padded example each.")
    val_fraction: float = option(0.05, "Fraction of records held out for val loss.")


@dataclass(kw_only=True)
class Inference:
    """How an inference command loads and runs the model at --model-path."""
    model_path: str = option(help=MODEL_PATH)
    dtype: Optional[str] = option(None, "Compute dtype.", choices=("float32", "bfloat16", "float16"),
                                  shown="bfloat16 on GPU, float32 on CPU")
    device: Optional[str] = option(None, "cpu, cuda, cuda:1 ...", shown="this rank's GPU, else cpu")
    tokenizer: Optional[str] = option(None, "Tokenizer spec, when the model path records none (gpt2, bytes, hf:PATH, "
                                      "sp:PATH).")


@dataclass(kw_only=True)
class PplConfig(Inference):
    data: Optional[str] = option(None, "Dataset dir: score its val_*.bin shards.", path=True)
    text_file: Optional[str] = option(None, "Score a UTF-8 text file.", path=True)
    hf_dataset: Optional[str] = option(None, "HF dataset name or local dir (wikitext: config wikitext-103-raw-v1 by "
                                       "default).")
    hf_config: Optional[str] = option(None, "HF dataset config.")
    split: str = option("test", "HF dataset split.")
    text_column: str = option("text", "HF dataset text column (documents joined with blank lines).")
    context: Optional[int] = option(None, "Tokens the model sees per window.", shown="the model's block size")
    stride: Optional[int] = option(None, "New tokens scored per window (= context: lm-eval's rolling loglikelihood).",
                                   shown="context/2")
    batch_size: int = option(8, "Windows per forward pass (does not change the result).")
    max_tokens: Optional[int] = option(None, "Score only the first N tokens (quick checks).")
    word_level: bool = option(False, "Also report word-level perplexity (GPT-2 paper style).", is_flag=True)
    progress: bool = option(True, "Progress bar on stderr.")


@dataclass(kw_only=True)
class HellaSwagConfig(Inference):
    jsonl: str = option(help="HellaSwag jsonl (ctx, endings, label), e.g. hellaswag_val.jsonl from "
                        "github.com/rowanz/hellaswag.", path=True)
    limit: Optional[int] = option(None, "Score only the first N examples.")
    progress: bool = option(True, "Progress bar on stderr.")


@dataclass(kw_only=True)
class HarnessConfig(Inference):
    tasks: str = option(help="Comma-separated lm-evaluation-harness tasks, e.g. "
                        "hellaswag,lambada_openai,arc_easy,piqa,wikitext.")
    limit: Optional[int] = option(None, "Score only the first N examples of each task.")
    num_fewshot: Optional[int] = option(None, "Few-shot examples per prompt.", shown="each task's own")
    batch_size: int = option(8, "Requests per forward pass (padded to the longest).")
    include_path: Optional[str] = option(None, "Directory of your own task YAMLs (e.g. over local jsonl files).",
                                         path=True)
    max_gen_toks: int = option(256, "Generation length for tasks that do not set one.")
    seed: int = option(1234, "Seed for tasks that sample (do_sample); request i uses seed + i.")
    progress: bool = option(True, "Progress bars on stderr.")


@dataclass(kw_only=True)
class GenerateConfig(Inference):
    prompt: str = option("", "Text to continue.", shown="empty: start from end-of-text")
    max_new_tokens: int = option(200, "Tokens to generate per sample.")
    temperature: float = option(1.0, "Sampling temperature (0 = greedy).")
    top_k: Optional[int] = option(None, "Sample from the k most likely tokens only (0 = off).")
    top_p: Optional[float] = option(None, "Nucleus sampling: smallest set with probability >= p.")
    num_samples: int = option(1, "Independent samples (sample i uses seed + i).")
    seed: int = option(1337, "Random seed.")
    use_cache: bool = option(True, "Use the KV cache.", flag="--cache")
    stop_at_eot: bool = option(True, "Stop a sample at end-of-text.")
    chat: bool = option(False, "Apply the fine-tuned model's chat template to --prompt; stop at its end marker.",
                        is_flag=True)
    template: Optional[str] = option(None, "Chat template to apply (plain, chatml, alpaca or a JSON file); implies "
                                     "--chat.")
    system: Optional[str] = option(None, "A system message before --prompt (with --chat).")


@dataclass(kw_only=True)
class EstimateConfig:
    model: str = option("gpt2-medium", "Model preset (gpt2, gpt2-medium, gpt25-medium, ...).")
    model_overrides: dict = option({})           # --set KEY=VALUE
    ds_config: str = option("zero2_bf16", "DeepSpeed JSON (path or name in ds_configs/): stage, precision, offload, "
                            "buckets.")
    gpus: int = option(1, "Data-parallel GPUs (ZeRO partitions over them).")
    micro_batch: int = option(8, "Sequences per GPU per forward pass.")
    seq_len: Optional[int] = option(None, "Tokens per sequence.", shown="the model's block_size")
    activation_checkpointing: bool = option(False, "Recompute block activations in backward.")
    gpu_memory: float = option(24.0, "Memory per GPU in GB (2**30 bytes).")
    table: bool = option(False, "Print the recommendation table for common models and GPUs.", is_flag=True)


@dataclass(kw_only=True)
class DoctorConfig:
    build_ops: bool = option(False, "Build DeepSpeed's C++/CUDA ops that configs here use (about a minute each, "
                             "once).", is_flag=True)
    ds_config: str = option("auto", "The DeepSpeed config you will run: its problems are failures.")
    out: str = option("runs", "Where checkpoints will go (free disk is checked there).")
    model: str = option("gpt2-medium", "Model preset whose checkpoint size the disk check uses.")
    keep_last: int = option(3, "Checkpoints kept (as pretrain --keep-last).")


@dataclass(kw_only=True)
class PlotConfig:
    runs: tuple = ()                             # the RUNS arguments
    out: str = option("curves.png", "Image to write (.png, .pdf, .svg).")
    x: str = option("step", "x axis: optimizer steps, or tokens seen (compares runs with different batch sizes).",
                    choices=("step", "tokens"))


def load_yaml(path: str) -> dict:
    """Read a run config YAML into a dict of TrainConfig fields (dashes allowed in keys)."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}")
    if not isinstance(values, dict):
        raise UserError(f"config file {path} must be a mapping of option: value, found {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def resolve(yaml_path: Optional[str], flags: dict, cls=TrainConfig) -> TrainConfig:
    """Defaults < YAML < flags. `flags` holds only the options the user actually passed; `cls` is the config
    class whose defaults apply (TrainConfig, or FinetuneConfig for `finetune`)."""
    values = load_yaml(yaml_path) if yaml_path else {}
    overrides = dict(values.pop("model_overrides", None) or values.pop("set", None) or {})
    overrides.update(flags.pop("model_overrides", {}) or {})
    if {"global_batch", "global_batch_tokens"} & set(flags):
        # A batch size flag replaces the YAML's batch size in whichever form the YAML gives it.
        values.pop("global_batch", None)
        values.pop("global_batch_tokens", None)
    values.update(flags)
    values["model_overrides"] = overrides
    if values.get("data") is None and cls is TrainConfig:
        values = {**DEMO_DEFAULTS, **values}
    config = cls.from_dict(values)
    validate(config)
    return config


def validate(c: TrainConfig) -> None:
    for name in ("lr", "min_lr", "epochs", "weight_decay", "grad_clip", "beta1", "beta2", "eps", "decay_frac",
                 "muon_lr", "muon_momentum", "muon_weight_decay"):
        value = getattr(c, name)  # NaN / inf / a YAML string would otherwise crash later or train on garbage
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not abs(value) < float("inf")):
            raise UserError(f"{name.replace('_', '-')} must be a finite number, got {value!r}")
    positive = ("micro_batch", "grad_accum", "global_batch", "global_batch_tokens", "max_steps", "max_tokens",
                "seq_len", "eval_batches", "log_every", "save_every", "eval_every", "keep_last")
    for name in positive:
        value = getattr(c, name)
        if name == "micro_batch" and value == "auto":
            continue
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0
                                  or (value == 0 and name not in ("eval_every", "save_every", "keep_last"))):
            raise UserError(f"{name.replace('_', '-')} must be a positive integer"
                            + (" or auto" if name == "micro_batch" else "") + f", got {value!r}")
    if c.schedule not in SCHEDULES:
        raise UserError(f"unknown schedule '{c.schedule}'; choose one of {', '.join(SCHEDULES)}")
    if c.lr <= 0 or c.min_lr < 0 or c.min_lr > c.lr:
        raise UserError(f"need 0 <= min-lr <= lr and lr > 0, got lr={c.lr} min-lr={c.min_lr}")
    if c.muon_lr <= 0 or not 0 <= c.muon_momentum < 1 or c.muon_weight_decay < 0:
        raise UserError(f"need muon-lr > 0, 0 <= muon-momentum < 1 and muon-weight-decay >= 0, got muon-lr={c.muon_lr} "
                        f"muon-momentum={c.muon_momentum} muon-weight-decay={c.muon_weight_decay}")
    if c.global_batch is not None and c.global_batch_tokens is not None:
        raise UserError("give either --global-batch (sequences) or --global-batch-tokens, not both")
    if c.epochs is not None and c.epochs <= 0:
        raise UserError(f"epochs must be positive, got {c.epochs}")
    if c.max_time is not None:
        parse_duration(c.max_time)
    if c.resume not in ("auto", "never") and not Path(c.resume).exists():
        raise UserError(f"--resume {c.resume}: no such checkpoint; use auto, never, or an existing checkpoint path")
    if c.hellaswag_every and not c.hellaswag_jsonl:
        raise UserError("--hellaswag-every needs --hellaswag-jsonl FILE (the HellaSwag validation jsonl)")


def parse_duration(text) -> float:
    """'24h', '90m', '3600s', '1d', '1h30m' or a plain number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    parts = re.fullmatch(r"\s*((\d+(\.\d+)?)\s*([dhms])\s*)+", str(text))
    if not parts:
        try:
            return float(text)
        except ValueError:
            raise UserError(f"cannot read duration '{text}'; write e.g. 24h, 90m, 1h30m or 3600s")
    return sum(float(n) * units[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)\s*([dhms])", str(text)))


def parse_set(items) -> dict:
    """`--set n_layer=4 --set dropout=0.1` -> {"n_layer": 4, "dropout": 0.1} (values parsed as YAML scalars)."""
    out = {}
    for item in items or ():
        if "=" not in item:
            raise UserError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            out[key.strip()] = value
    return out


def save_yaml(config: TrainConfig, path: Path) -> None:
    """Write the resolved config; `pretrain --config RUN/config.yaml` reproduces the run."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))
