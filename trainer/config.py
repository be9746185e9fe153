"""TrainConfig: everything about a run that is not architecture (ModelConfig) or ZeRO (ds_configs).

A run config comes from, in order of precedence: command-line flags, a YAML file (`--config`),
then these defaults. The resolved config is written to RUN/config.yaml and stored in every
checkpoint. Unknown YAML keys are errors that list the valid ones, so a typo never goes unnoticed.
"""
import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import yaml

from trainer.errors import UserError
from trainer.fileio import atomic_write_text

DEMO_MODEL = "gpt2-mini"
DEMO_OUT = "runs/demo"
# When no --data is given the run is the offline demo: short enough for a laptop CPU, long enough for the
# loss to fall clearly. Only options the user did not set take these values.
DEMO_DEFAULTS = dict(max_steps=200, micro_batch=8, seq_len=256, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                     eval_every=50, eval_batches=8, save_every=100, log_every=10)


@dataclass
class TrainConfig:
    # what to train
    model: str = DEMO_MODEL                      # preset name (models.list_configs())
    model_overrides: dict = field(default_factory=dict)  # --set KEY=VALUE
    data: Optional[str] = None                   # dataset dir (shards + meta.json); None = offline demo data
    tokenizer: Optional[str] = None              # only used to prepare demo data when data is None
    out: str = DEMO_OUT
    ds_config: str = "auto"                      # auto = zero2_bf16 on GPUs; see ds_config.auto_ds_config
    init_from: Optional[str] = None              # consolidated model dir, HF dir or hub name
    # batch
    seq_len: Optional[int] = None                # default: the model's block_size
    micro_batch: Union[int, str] = 8             # or "auto": the largest the memory estimate fits (trainer/batching.py)
    grad_accum: Optional[int] = None             # default: derived from global batch, else 1
    global_batch: Optional[int] = None           # sequences per optimizer step, all ranks
    global_batch_tokens: Optional[int] = None    # tokens per optimizer step, all ranks
    # length
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None
    epochs: Optional[float] = None
    max_time: Optional[str] = None               # e.g. 24h, 90m, 3600s
    stop_after_steps: Optional[int] = None       # pause: save and exit after N steps, schedule unchanged
    # optimisation
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    schedule: str = "cosine"
    decay_frac: float = 0.2                      # wsd: fraction of steps spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: Optional[float] = None            # None: 1.0, or off where DeepSpeed cannot (default_grad_clip)
    # Muon (a ds_configs JSON with "type": "Muon"): the blocks' hidden matrices; the rest stays on AdamW (lr above)
    muon_lr: float = 0.02                        # peak rate of the Muon group; follows lr's schedule (scaled)
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.0               # decoupled, like AdamW's: p *= 1 - muon_lr * muon_weight_decay
    seed: int = 1337
    activation_checkpointing: bool = False
    doc_masking: bool = False                    # attention and positions restart at every document in a window
    deterministic: bool = False                  # bitwise repeatable steps on GPUs too (trainer/determinism.py)
    compile: Optional[bool] = None               # None: torch.compile on CUDA GPUs, eager on CPUs
    max_skips: int = 10                          # consecutive non-finite steps before a rollback
    max_rollbacks: int = 3                       # rollbacks to the last checkpoint before giving up
    # cadence
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    resume: str = "auto"                         # auto | never | PATH
    hellaswag_every: int = 0
    hellaswag_jsonl: Optional[str] = None
    # tracking
    tracking: bool = True                        # TensorBoard (and W&B if a project is given)
    wandb_project: Optional[str] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown run config key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
        return cls(**values)


@dataclass
class FinetuneConfig(TrainConfig):
    """A `finetune` run: a TrainConfig with fine-tuning defaults (a small learning rate, no weight decay,
    one epoch) plus the instruction data's settings (trainer/sft/). The architecture is
    --init-from's, so there is no preset; `seq_len` is --max-seq-len: the training window and the longest
    example; `tokenizer` names the base model's tokenizer when it records none."""
    model: Optional[str] = None                  # the architecture comes from init_from
    out: str = "runs/finetune"
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_steps: int = 20
    weight_decay: float = 0.0
    eval_every: int = 100
    save_every: int = 500
    sft_format: str = "auto"                     # auto | alpaca | chat | prompt-completion
    template: str = "plain"                      # a built-in template name or a JSON file (trainer/sft/template.py)
    packing: bool = True                         # pack examples into windows (else one example per window, padded)
    val_fraction: float = 0.05                   # records held out for val loss


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
    from trainer.optim import SCHEDULES

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
