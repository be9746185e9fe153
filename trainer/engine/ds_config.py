"""The DeepSpeed JSON: find it, read it, and write the trainer's numbers into it.

The JSON owns the ZeRO stage, precision, offload and optimizer type; the trainer owns batch sizes,
accumulation, clipping, learning rate, betas, eps and weight decay (with Muon also muon_lr, adam_lr and
momentum) and writes them in. A JSON that
sets a trainer-owned key to a different value is refused with the key named, so a run never silently
uses numbers the user did not choose. Pure dictionaries: nothing here imports deepspeed.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from trainer.errors import UserError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"

# Keys the trainer computes; a JSON may omit them, say "auto", or repeat the same value.
TRAINER_OWNED_TOP = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping")
TRAINER_OWNED_OPTIM = ("lr", "betas", "eps", "weight_decay")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX); without them torch emulates
    bf16 matmuls, far slower than fp32 ones on the same cores."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_ds_config() -> str:
    """`--ds-config auto`: ZeRO-2 in the fastest precision this machine really has."""
    if torch.cuda.is_available():
        return "zero2_bf16" if torch.cuda.is_bf16_supported() else "zero2_fp16"
    return "zero2_bf16" if cpu_has_native_bf16() else "zero2_fp32"


def resolve_ds_config_path(spec: str) -> Path:
    """Accept a path, a file name in ds_configs/, a bare name like `zero2_bf16`, or `auto`."""
    if spec == "auto":
        spec = auto_ds_config()
    candidates = [Path(spec), DS_CONFIG_DIR / spec, DS_CONFIG_DIR / f"{spec}.json"]
    for path in candidates:
        if path.is_file():
            return path
    available = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise UserError(f"DeepSpeed config '{spec}' not found; pass a JSON file path or one of: {available}")


def load_ds_config(spec: str) -> dict:
    path = resolve_ds_config_path(spec)
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); fix the file")
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, found {type(config).__name__}")
    return config


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return a == b


def _claim(section: dict, key: str, value, where: str, flag: str) -> None:
    current = section.get(key, "auto")
    if current != "auto" and not _same(current, value):
        raise UserError(f"DeepSpeed config sets {where}{key}={current!r} but the trainer computed {value!r}; "
                        f"remove the key from the JSON (the trainer owns it) or pass {flag}")
    section[key] = value


def build_ds_config(base: dict, *, micro_batch: int, grad_accum: int, world_size: int, grad_clip: float,
                    lr: float, betas: tuple, eps: float, weight_decay: float, muon_lr: float = 0.02,
                    muon_momentum: float = 0.95) -> dict:
    """Return a copy of `base` with the trainer-owned numbers written in (or an error on conflict)."""
    config = json.loads(json.dumps(base))
    if "scheduler" in config:
        raise UserError("DeepSpeed config has a 'scheduler' block; remove it: the trainer sets the learning rate of "
                        "every step itself (--schedule, --lr, --min-lr, --warmup-steps), so a resumed run continues it")
    _claim(config, "train_micro_batch_size_per_gpu", micro_batch, "", "--micro-batch")
    _claim(config, "gradient_accumulation_steps", grad_accum, "", "--grad-accum / --global-batch")
    _claim(config, "train_batch_size", micro_batch * grad_accum * world_size, "", "--global-batch")
    _claim(config, "gradient_clipping", grad_clip, "", "--grad-clip")
    optimizer = config.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = optimizer.setdefault("params", {})
    for key, value, flag in (("lr", lr, "--lr"), ("betas", list(betas), "--beta1/--beta2"), ("eps", eps, "--eps"),
                             ("weight_decay", weight_decay, "--weight-decay")):
        _claim(params, key, value, "optimizer.params.", flag)
    if uses_muon(config):
        _check_muon(config, grad_clip)
        for key, value, flag in (("muon_lr", muon_lr, "--muon-lr"), ("adam_lr", lr, "--lr"),
                                 ("momentum", muon_momentum, "--muon-momentum")):
            _claim(params, key, value, "optimizer.params.", flag)
    return config


def default_grad_clip(config: dict) -> tuple[float, Optional[str]]:
    """The --grad-clip a run gets when it gives none: 1.0, except where DeepSpeed's clip is not a gradient
    clip (Muon under ZeRO-1/2/3, `muon_update_in_grad_norm`): off, with the one line that says why."""
    if muon_update_in_grad_norm(config):
        return 0.0, (f"grad-clip off: under ZeRO-{zero_stage(config)} DeepSpeed would clip Muon's orthogonalized "
                     "update, not the gradient (Muon's updates are normalized by construction); "
                     "ds_configs/zero0_muon_bf16.json clips the raw gradients")
    return 1.0, None


@dataclass(frozen=True)
class OptimizerImpl:
    """The optimizer code DeepSpeed will run for a JSON on a device (DeepSpeed's own rule, in
    `DeepSpeedEngine.get_optimizer_configuration`): torch's AdamW when `"torch_adam": true`, else its
    C++/CUDA ops, FusedAdam or (with offload_optimizer) CPU Adam, which are built on first use."""
    label: str                     # e.g. "torch.optim.AdamW (fused)"
    op: Optional[str] = None       # the DeepSpeed op that must be built first; None: pure PyTorch
    fused: Optional[bool] = None   # torch AdamW's implementation flags (None: not torch's AdamW)
    foreach: Optional[bool] = None
    muon_ns: Optional[str] = None  # Newton-Schulz method the trainer sets for Muon (None: the JSON's or DeepSpeed's)

    @property
    def adam_flags(self) -> Optional[dict]:
        return None if self.fused is None else {"fused": self.fused, "foreach": self.foreach}


ADAM_TYPES = ("adam", "adamw", "muon")
BUILT_OPS = {"fused_adam": "DeepSpeed FusedAdam", "cpu_adam": "DeepSpeed CPUAdam"}


def optimizer_implementation(config: dict, device_type: str) -> OptimizerImpl:
    """Which Adam this JSON runs on `device_type` ("cuda", "cpu", ...). torch's AdamW is fused where its state
    lives on a GPU and foreach on the CPU, unless the JSON sets `fused` / `foreach` itself."""
    kind = optimizer_type(config)
    if kind not in ADAM_TYPES:
        return OptimizerImpl(f"DeepSpeed's {config['optimizer'].get('type')} optimizer")
    params = config.get("optimizer", {}).get("params", {})
    muon_ns = None
    if kind == "muon" and "ns_method" not in params and device_type != "cuda" and precision(config) == "bf16":
        # DeepSpeed's default "gram" iteration runs in fp16, or in fp32 where the accelerator has no fp16 (a
        # CPU); the standard quintic iteration runs in bf16 there, as modded-nanogpt runs it on GPUs.
        muon_ns = "standard"
    muon = f"Muon ({muon_ns} Newton-Schulz) + " if muon_ns else "Muon + " if kind == "muon" else ""
    if params.get("torch_adam"):
        on_gpu = device_type == "cuda" and not offloads_optimizer(config)
        fused, foreach = params.get("fused"), params.get("foreach")
        if fused and foreach:
            raise UserError("DeepSpeed config sets both optimizer.params.fused and optimizer.params.foreach; torch's "
                            "AdamW runs one implementation: remove one of them")
        if fused is None and foreach is None:
            fused, foreach = on_gpu, not on_gpu
        how = "fused" if fused else "foreach" if foreach else "for-loop"
        # DeepSpeed builds torch's Adam only for type "Adam" with adam_w_mode false (decoupled decay otherwise)
        name = "Adam" if kind == "adam" and not params.get("adam_w_mode", True) else "AdamW"
        return OptimizerImpl(f"{muon}torch.optim.{name} ({how})", fused=bool(fused), foreach=bool(foreach),
                             muon_ns=muon_ns)
    op = "cpu_adam" if offloads_optimizer(config) else "fused_adam"
    return OptimizerImpl(f"{muon}{BUILT_OPS[op]}", op=op, muon_ns=muon_ns)


def optimizer_type(config: dict) -> str:
    """The JSON's optimizer type, lower case as DeepSpeed reads it (AdamW when the JSON names none)."""
    return str((config.get("optimizer") or {}).get("type", "AdamW")).lower()


def uses_muon(config: dict) -> bool:
    """The JSON picks DeepSpeed's Muon (hidden matrices) with its auxiliary AdamW (everything else)."""
    return optimizer_type(config) == "muon"


def muon_update_in_grad_norm(config: dict) -> bool:
    """True where DeepSpeed 0.19 puts Muon's orthogonalized update, not the gradient, into the global
    gradient norm: ZeRO-1/2/3 run Newton-Schulz while they partition the reduced gradients, and then
    measure and clip what is left in the gradient buffers (ZeRO-0 clips the raw gradients first; see
    bench/upstream_muon.md). That norm is then no gradient norm, and a clip by it shrinks every Muon step."""
    return uses_muon(config) and zero_stage(config) >= 1


def _check_muon(config: dict, grad_clip: float) -> None:
    """Refuse the Muon combination that does not train correctly (ZeRO-2 with offload_optimizer is one of the
    ZeRO-1/2/3 cases: it orthogonalizes before its clip too)."""
    if grad_clip and muon_update_in_grad_norm(config):
        raise UserError(f"Muon under ZeRO-{zero_stage(config)} with --grad-clip {grad_clip}: DeepSpeed clips Muon's "
                        "orthogonalized update there instead of the gradient, which shrinks every step and the run "
                        "barely learns. Pass --grad-clip 0 (Muon's updates are normalized by construction), or use "
                        "ZeRO-0 (ds_configs/zero0_muon_bf16.json), which clips the raw gradients")


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def precision(config: dict) -> str:
    """bf16 | fp16 | fp32, read as DeepSpeed reads it: the `bf16` section, or the older spelling
    `bfloat16` when there is no `bf16` section."""
    bf16 = config.get("bf16")
    if bf16 is None:
        bf16 = config.get("bfloat16", {})
    if (bf16 or {}).get("enabled"):
        return "bf16"
    if (config.get("fp16") or {}).get("enabled"):
        return "fp16"
    return "fp32"


def offloads_optimizer(config: dict) -> bool:
    device = config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")
