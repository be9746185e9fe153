"""DeepSpeed itself: the process group, the engine, the accelerator, and DeepSpeed's own op checks for
`doctor`. The DeepSpeed JSON is merged in trainer/engine/ds_config.py; deepspeed is imported here and in
trainer/checkpoint/ only.
"""
import atexit
import contextlib
import fcntl
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

import torch

from trainer import dist
from trainer.engine.ds_config import optimizer_implementation, precision, uses_muon
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
    _skip_shm_all_reduce()
    try:
        deepspeed.init_distributed(verbose=False)
    except Exception as e:
        raise UserError(f"rank {dist.rank()}: DeepSpeed could not start torch.distributed ({describe(e)}); check "
                        "the launcher's MASTER_ADDR / MASTER_PORT and that every rank can reach rank 0",
                        every_rank=False) from e
    if torch.cuda.is_available():
        torch.cuda.set_device(dist.local_rank())


def _skip_shm_all_reduce() -> None:
    """On a CPU, DeepSpeed JIT-builds a shared-memory all-reduce (a C++ op) whenever it starts
    torch.distributed, even for a single process, which has nothing to reduce. Without it CPU ranks
    reduce through gloo, so no default path, one rank or several, waits for a compiler."""
    import importlib

    ds_comm = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would find deepspeed.comm's `torch`
    ds_comm.build_shm_op = lambda: None


def _destroy_process_group_at_exit() -> None:
    """Exiting with the process group alive lets C++ destructors meet its communication threads still
    running, which can abort a finished multi-rank process (exit -6, "terminate called without an active
    exception"). At exit, not at the end of a run: DeepSpeed keeps its groups for a later run in the same
    process (tests run several)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def gpu_memory_gb() -> Optional[float]:
    """Memory of the smallest GPU any rank of the launch has (GB = 2**30 bytes); None without GPUs."""
    if not torch.cuda.is_available():
        return None
    mine = torch.tensor(-float(torch.cuda.get_device_properties(dist.local_rank()).total_memory), device=device())
    return -float(dist.all_reduce_max(mine)) / 2 ** 30


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
    """Build the DeepSpeed engine. No LR scheduler: the trainer sets each step's rate itself (trainer/train/optim.py).
    With Muon, each group's `use_muon` says which optimizer updates its parameters."""
    deepspeed = import_deepspeed()

    check_precision_supported(ds_config)
    if uses_muon(ds_config):
        from trainer.engine import muon as engine_muon

        engine_muon.install()
    try:
        with _muon_tags(deepspeed, param_groups if uses_muon(ds_config) else []):
            engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups, config=ds_config)
    except UserError:
        raise
    except Exception as e:  # one line, said once where every rank fails alike (initialize_error)
        raise initialize_error(e, ds_config) from e
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
        raise ValueError("a Muon config needs the parameter groups of trainer.train.optim.param_groups(..., muon=True)")
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


def initialize_error(error: Exception, ds_config: dict) -> UserError:
    """A failure inside deepspeed.initialize as one line: what failed and how to fix it. Most often an op
    DeepSpeed had to build for the optimizer (the configs with "torch_adam": true build none): said as that
    only where the error came out of DeepSpeed's op builder, since one rank's failure (its GPU out of
    memory while the model moves there) can come first on a machine where the op is not built either."""
    impl = optimizer_implementation(ds_config, device().type)
    what = f"DeepSpeed could not build the engine ({describe(error)})"
    in_op_build = any("op_builder" in Path(frame.filename).parts for frame in traceback.extract_tb(error.__traceback__))
    status = op_status([impl.op])[impl.op] if impl.op and in_op_build else None
    if status is None or status["state"] != "not built":  # not a failed op build: maybe this rank's alone (its GPU)
        return UserError(f"rank {dist.rank()}: {what}; `python -m trainer.cli doctor` checks this machine",
                         every_rank=False)
    cause = "; ".join(f"{found}, fix: {fix}" for found, fix in status["problems"]) or "see the compiler output above"
    return UserError(f"DeepSpeed could not build its {impl.op} op, which {impl.label} needs ({describe(error)}): "
                     f"{cause}. Or run with nothing to build: a config with \"torch_adam\": true (every shipped "
                     "config but zero2_offload_bf16 and zero2_fusedadam_bf16) uses torch's own AdamW", every_rank=True)


def compile_model(engine, backend: Optional[str] = None) -> Optional[str]:
    """torch.compile through DeepSpeed's own hook, so ZeRO's forward/backward hooks stay in place. Returns
    None, or why torch.compile cannot work here (the model then stays eager). Compilation itself happens
    at the first forward; `uncompile` undoes this if it fails there."""
    missing = compile_blocker(engine.device)
    if missing:
        return missing
    engine.compile(**({"backend": backend} if backend else {}))
    return None


def compile_blocker(device: torch.device) -> Optional[str]:
    """What inductor, torch.compile's code generator, lacks on this machine, if anything."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile on a GPU needs triton (pip install triton)"
    from torch._inductor import cpp_builder

    try:
        cpp_builder.get_cpp_compiler()
    except Exception:  # torch's own search for g++ / $CXX failed
        return "torch.compile on a CPU needs a C++ compiler (g++, or $CXX)"
    return None


def is_compile_error(error: BaseException) -> bool:
    """An error raised by torch.compile's tracer or code generator (not by the model's own code)."""
    return type(error).__module__.startswith(("torch._dynamo", "torch._inductor"))


def describe_compile_error(error: BaseException) -> str:
    """One line for a torch.compile failure: the backend's own error where dynamo wraps one."""
    inner = getattr(error, "inner_exception", None)
    return describe(inner if inner is not None else error, line=0)


def uncompile(engine) -> None:
    """Back to the eager module: what DeepSpeed's engine.compile() set (nn.Module.compile in place), undone."""
    engine.module._compiled_call_impl = None
    engine._is_compiled = False


# ---- pre-flight checks for `doctor` ----------------------------------------------------------------------
OP_BUILDERS = {"fused_adam": "FusedAdamBuilder", "cpu_adam": "CPUAdamBuilder"}


def versions() -> dict:
    """DeepSpeed version and accelerator, without starting torch.distributed."""
    deepspeed = import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    return {"deepspeed": deepspeed.__version__, "accelerator": accel.device_name(),
            "accelerator_bf16": bool(accel.is_bf16_supported()), "accelerator_fp16": bool(accel.is_fp16_supported())}


def _extensions_dir() -> Path:
    """Where torch JIT-builds extensions (torch.utils.cpp_extension's rule, without creating the folder as
    its `_get_build_directory` does)."""
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    kind = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
            f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    return Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{kind}"


def op_status(names=tuple(OP_BUILDERS), build: bool = False) -> dict:
    """For each of DeepSpeed's ops in `names`: {state, cuda, problems, error}.

    state: "prebuilt" (in the wheel), "cached" (JIT-built before), "built" (built now: `build=True`),
    "not built", "failed" (a build was tried and failed: `error`), "absent" (no such op on this accelerator).
    problems: what would break a build here, each as (what was found, its fix); an op that is already
    built needs nothing. Nothing is built unless `build`.
    """
    import importlib.util

    import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    out = {}
    for name in names:
        info = {"state": "absent", "cuda": False, "problems": [], "error": None}
        out[name] = info
        builder = get_accelerator().create_op_builder(OP_BUILDERS[name])
        if builder is None:
            continue
        info["cuda"] = _is_cuda_builder(builder)
        try:
            prebuilt = importlib.util.find_spec(builder.absolute_name()) is not None
        except (ImportError, ValueError):
            prebuilt = False
        cached = (_extensions_dir() / builder.name / f"{builder.name}.so").is_file()
        info["state"] = "prebuilt" if prebuilt else "cached" if cached else "not built"
        if info["state"] == "not built":
            info["problems"] = build_problems(builder)
            if build:
                try:
                    builder.load(verbose=False)
                    info["state"] = "built"
                except Exception as e:  # an op that fails to build is a finding to report, not a crash
                    info["state"], info["error"] = "failed", describe(e)[:300]
    return out


def _is_cuda_builder(builder) -> bool:
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    return isinstance(builder, CUDAOpBuilder) and torch.cuda.is_available() and torch.version.hip is None


def build_problems(builder) -> list[tuple[str, str]]:
    """What would stop DeepSpeed's JIT build of `builder`'s op on this machine, each with its fix."""
    import shutil
    import sysconfig

    from torch.utils import cpp_extension

    problems = []
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        problems.append((f"no C++ compiler ({compiler} is not on PATH)",
                         "install one (apt-get install build-essential, or conda install gxx_linux-64)"))
    if not cpp_extension.is_ninja_available():
        problems.append(("ninja is not installed", "pip install ninja"))
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").is_file():
        problems.append(("Python's C headers (Python.h) are missing", "install python3-dev for this Python"))
    if not _is_cuda_builder(builder):
        return problems
    nvcc = Path(cpp_extension.CUDA_HOME or "/nonexistent") / "bin" / "nvcc"
    if not nvcc.is_file():
        problems.append((f"no nvcc (CUDA_HOME is {cpp_extension.CUDA_HOME}): a pip-installed torch brings no CUDA "
                         "compiler", f"install the CUDA {torch.version.cuda} toolkit (conda install -c nvidia "
                         f"cuda-nvcc={torch.version.cuda}) and set CUDA_HOME to it"))
        return problems
    from deepspeed.ops.op_builder.builder import assert_no_cuda_mismatch

    try:
        with contextlib.redirect_stdout(sys.stderr):
            assert_no_cuda_mismatch(builder.name)
    except Exception as e:
        problems.append((f"nvcc and torch disagree on the CUDA version ({describe(e)})",
                         f"install the CUDA {torch.version.cuda} toolkit, or a torch built for your nvcc"))
    arch = arch_list_problem(builder)
    if arch:
        problems.append(arch)
    return problems


def arch_list_problem(builder) -> Optional[tuple[str, str]]:
    """TORCH_CUDA_ARCH_LIST as DeepSpeed's JIT build reads it (its own parser, so the verdict is DeepSpeed's):
    entries such as `9.0a` (Hopper's arch-specific suffix, which torch accepts) make it fail."""
    value = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not value or not value.strip():
        return None
    saved_mode, saved_list = builder.jit_mode, getattr(builder, "_jit_arch_list", None)
    builder.jit_mode, builder._jit_arch_list = True, value.strip()
    try:
        builder.compute_capability_args()
    except Exception as e:
        plain = ";".join(dict.fromkeys(m.group(0) for m in re.finditer(r"\d+\.\d+", value)))
        return (f"TORCH_CUDA_ARCH_LIST={value!r} has an entry DeepSpeed's op builder cannot parse ({describe(e)})",
                f"build with TORCH_CUDA_ARCH_LIST={plain!r}")
    finally:
        builder.jit_mode, builder._jit_arch_list = saved_mode, saved_list
        os.environ["TORCH_CUDA_ARCH_LIST"] = value  # compute_capability_args rewrites it
    return None
