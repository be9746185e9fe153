"""DeepSpeed itself: the process group, the engine, the accelerator, and DeepSpeed's own op checks for
`doctor`. The DeepSpeed JSON is merged in trainer/ds_config.py; deepspeed is imported here and in
trainer/checkpoint/ only.
"""
import atexit
import contextlib
import fcntl
import os
import sys
from pathlib import Path

import torch

from trainer import dist
from trainer.ds_config import precision, uses_muon
from trainer.errors import UserError, describe


def import_deepspeed():
    """deepspeed, with its log lines on stderr. Its logger's handler takes sys.stdout when the package
    is first imported, and logs the accelerator choice right then; our stdout carries results
    (generated text, --json), so the first import happens with stdout pointing at stderr."""
    _lock_op_builds_with_flock()
    if "deepspeed" not in sys.modules:
        with contextlib.redirect_stdout(sys.stderr):
            import deepspeed  # noqa: F401
    return sys.modules["deepspeed"]


class _FlockBaton:
    """torch.utils.cpp_extension's build lock, held with flock instead of by the file's existence.

    DeepSpeed JIT-loads its ops (fused Adam, CPU Adam, the CPU all-reduce) through torch, which takes a
    `lock` file in the op's build directory for every load, even when nothing needs building, and
    deletes it afterwards. A process killed in that second (kill -9, a preempted node) leaves the file,
    and every later run of any program waits for it forever, silently, inside deepspeed.initialize. An
    flock dies with its process: a leftover file is simply taken over. Same file, same deletion on
    release, so programs using torch's own lock still wait for ours."""

    def __init__(self, lock_file_path, wait_seconds=0.1, warn_after_seconds=None):
        self.lock_file_path = lock_file_path
        self.fd = None

    def try_acquire(self) -> bool:
        fd = os.open(self.lock_file_path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def wait(self) -> None:
        """Until the holder releases (it deletes the file, then its flock goes)."""
        try:
            fd = os.open(self.lock_file_path, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.lock_file_path)
            os.close(self.fd)
            self.fd = None


def _lock_op_builds_with_flock() -> None:
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.FileBaton = _FlockBaton


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
    _unlink_shm_buffer()


def _unlink_shm_buffer() -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce gives every rank a ~69 MB /dev/shm buffer that it never
    unlinks: each multi-rank run (killed or not) would leave them behind until /dev/shm, which is RAM, is
    full. Once every rank has mapped every buffer (init returned everywhere: the barrier), the names can go;
    the mappings live on until the processes exit, however they exit."""
    if dist.world_size() == 1 or torch.cuda.is_available():
        return
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{dist.rank()}")
    dist.barrier()
    Path("/dev/shm", name).unlink(missing_ok=True)


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
    deepspeed = import_deepspeed()

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

    import_deepspeed()
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
            info["error"] = describe(e)[:300]
    return out
