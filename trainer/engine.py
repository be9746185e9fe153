"""DeepSpeed setup: merge the trainer's numbers into a ds_configs JSON and build the engine.

Ownership of config keys (STYLE.md, convention 7): the JSON owns ZeRO stage, precision, offload
and optimizer type; the trainer owns batch sizes, accumulation, clipping, learning rate, betas,
eps and weight decay and writes them in. A JSON that sets a trainer-owned key to a different value
is refused with the key named, so a run never silently uses numbers the user did not choose.
This module and trainer/checkpoint.py are the only places that import deepspeed.
"""
import atexit
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

from trainer import dist
from trainer.errors import UserError

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

# Keys the trainer computes; a JSON may omit them, say "auto", or repeat the same value.
TRAINER_OWNED_TOP = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping")
TRAINER_OWNED_OPTIM = ("lr", "betas", "eps", "weight_decay")


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 matmul instructions (AVX512-BF16 or AMX); without them torch emulates
    bf16 matmuls, measured here at ~1 GFLOP/s against ~110 GFLOP/s in fp32 on the same 2 cores."""
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
    bench/upstream_muon.md). That norm is then no gradient norm, and a clip by it shrinks
    every Muon step (about 60x at 4 layers x 128)."""
    return uses_muon(config) and zero_stage(config) >= 1


def _check_muon(config: dict, grad_clip: float) -> None:
    """Refuse the Muon combination that does not train correctly (ZeRO-2 with offload_optimizer is one of the
    ZeRO-1/2/3 cases: it orthogonalizes before its clip too)."""
    stage = zero_stage(config)
    if grad_clip and muon_update_in_grad_norm(config):
        raise UserError(f"Muon under ZeRO-{stage} with --grad-clip {grad_clip}: DeepSpeed clips Muon's "
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


def import_deepspeed():
    """deepspeed, with its log lines on stderr. Its logger's handler takes sys.stdout when the package
    is first imported, and logs the accelerator choice right then; our stdout carries results
    (generated text, --json), so the first import happens with stdout pointing at stderr."""
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    return sys.modules["deepspeed"]


def init_distributed() -> None:
    """Start torch.distributed through DeepSpeed (nccl on GPU, gloo/ccl on CPU) for any launcher."""
    deepspeed = import_deepspeed()
    atexit.unregister(_destroy_process_group_at_exit)  # registered once however often this runs
    atexit.register(_destroy_process_group_at_exit)

    dist.ensure_dist_env()
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # Ranks sharing one CPU would otherwise each start a thread per core and thrash.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local_world)))
    deepspeed.init_distributed(verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())


def _destroy_process_group_at_exit() -> None:
    """Exiting with the process group alive lets C++ destructors meet its communication threads still
    running, which aborted finished 2-rank processes (exit -6, "terminate called without an active
    exception") on a loaded machine. At exit, not at the end of a run: DeepSpeed keeps its groups for
    a later run in the same process (tests run several)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().device_name(dist.local_rank()))


def check_precision_supported(config: dict) -> None:
    """fp16 needs a GPU; DeepSpeed's own message for it is a traceback deep inside initialize."""
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    wanted = precision(config)
    if wanted == "fp16" and not accel.is_fp16_supported():
        raise UserError(f"this config asks for fp16, which DeepSpeed does not support on the {accel.device_name()} "
                        "accelerator; use a bf16 config (e.g. --ds-config ds_configs/zero2_bf16.json) here, "
                        "fp16 configs are for pre-Ampere GPUs")
    if wanted == "bf16" and not accel.is_bf16_supported():
        raise UserError(f"this config asks for bf16, which this {accel.device_name()} device does not support; "
                        "use ds_configs/zero2_fp16.json on pre-Ampere GPUs")


def initialize(model: torch.nn.Module, param_groups, ds_config: dict):
    """Build the DeepSpeed engine. No LR scheduler: the trainer sets each step's rate itself (trainer/optim.py).
    With Muon, each group's `use_muon` says which optimizer updates its parameters."""
    import deepspeed

    check_precision_supported(ds_config)
    with _muon_tags(deepspeed, param_groups if uses_muon(ds_config) else []):
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    if uses_muon(ds_config):
        built = [bool(g.get("use_muon")) for g in engine.optimizer.param_groups]
        if built != [g["use_muon"] for g in param_groups]:
            raise RuntimeError(f"DeepSpeed built Muon groups {built}, expected {[g['use_muon'] for g in param_groups]}")
    return engine


@contextlib.contextmanager
def _muon_tags(deepspeed, param_groups):
    """Our Muon tags, applied right after DeepSpeed's own.

    deepspeed.initialize tags every parameter itself (`set_optimizer_flags`: Muon for any 2-D weight
    whose name lacks "embed" and "lm_head"), overwriting tags set before, and then splits the groups
    by those tags. GPT-2's embeddings are named `wte` / `wpe`, so they would get Muon, and with tied
    embeddings so would the head. Wrapping that one function is the only place between the two.
    """
    if any("use_muon" not in group for group in param_groups):
        raise ValueError("a Muon config needs the parameter groups of trainer.optim.param_groups(..., muon=True)")
    tags = {id(p): group["use_muon"] for group in param_groups for p in group["params"]}
    if not tags:
        yield
        return
    original = deepspeed.set_optimizer_flags

    def tag(config_class, model):
        original(config_class, model)
        for param in model.parameters():
            if id(param) in tags:
                param.use_muon = tags[id(param)]

    deepspeed.set_optimizer_flags = tag
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = original


def compile_model(engine) -> None:
    """torch.compile through DeepSpeed's own hook, so ZeRO's forward/backward hooks stay in place."""
    engine.compile()


# ---- pre-flight checks for `doctor` (owner: memory engineer) -----------------------------------
DOCTOR_OPS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def versions() -> dict:
    """DeepSpeed version and accelerator, without starting torch.distributed."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return {"deepspeed": deepspeed.__version__, "accelerator": accel.device_name(),
            "accelerator_bf16": bool(accel.is_bf16_supported()), "accelerator_fp16": bool(accel.is_fp16_supported())}


def op_status(build: bool = False) -> dict:
    """For DeepSpeed's Adam ops: {name: {compatible, prebuilt, cached, loaded, error}}.

    A JIT build takes ~100 s and a compiler, so by default only an op that is prebuilt or already
    cached under ~/.cache/torch_extensions is loaded (a second or two); `build=True` loads (builds) all.
    """
    import importlib.util

    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    out = {}
    for name, builder_name in DOCTOR_OPS.items():
        info = {"compatible": False, "prebuilt": False, "cached": False, "loaded": None, "error": None}
        out[name] = info
        try:
            builder = get_accelerator().create_op_builder(builder_name)
            if builder is None:
                info["error"] = f"the {get_accelerator().device_name()} accelerator has no {builder_name}"
                continue
            info["compatible"] = bool(builder.is_compatible(verbose=False))
            try:
                info["prebuilt"] = importlib.util.find_spec(builder.absolute_name()) is not None
            except (ImportError, ValueError):
                pass
            build_dir = Path(_get_build_directory(builder.name, verbose=False))
            info["cached"] = (build_dir / f"{builder.name}.so").is_file()
            if info["compatible"] and (build or info["prebuilt"] or info["cached"]):
                builder.load(verbose=False)
                info["loaded"] = True
        except Exception as e:  # an op that fails to build is a finding to report, not a crash
            info["loaded"] = False
            info["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]
    return out
