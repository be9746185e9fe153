"""Loading checkpoint files without running code from them.

A `.pt` file is a pickle, and unpickling can call any function the file names: a checkpoint from a
hub, a colleague or a shared disk could run a shell command the moment it is loaded. Every file the
trainer reads itself goes through torch's restricted unpickler (`weights_only=True`), which builds
only tensors, containers and the types listed in ALLOWED: exactly what DeepSpeed's checkpoints and
ours hold. DeepSpeed's own loaders (resume through the engine, `zero_to_fp32`, `ds_to_universal`)
unpickle without that restriction, so `check_checkpoint` loads every file of a checkpoint the safe
way first (memory-mapped: the pickles are read, the tensor data is not); a file that passes builds
only allowed objects under either unpickler.

A file that needs anything else is refused in one line naming the file and the type, with nothing
run. `--trust-checkpoints` (`trust()`) lifts the restriction for files from a source you trust.
"""
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch

from trainer.errors import UserError

_TRUSTED = False


def _numpy_array_types() -> list:
    """What a numpy array pickles as (the NumPy RNG state in every checkpoint is one). NumPy 2 moved
    numpy.core to numpy._core; files written under NumPy 1 name the old module, so both names are allowed."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    # the state's key array is uint32: its dtype is rebuilt from numpy.dtype, as numpy's UInt32DType class
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _deepspeed_types() -> list:
    """The classes DeepSpeed itself pickles into its checkpoint files (ZeRO's stage enum and fragment
    addresses, the loss scalers of its fp16 and bf16 optimizers)."""
    from trainer.engine.build import import_deepspeed

    import_deepspeed()  # its first import logs to stderr, not to the results on stdout
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def allowed() -> list:
    """ALLOWED: the non-tensor types DeepSpeed's and the trainer's checkpoint files pickle."""
    return [*_numpy_array_types(), *_deepspeed_types()]


def trust() -> None:
    """Load checkpoint files with full pickle from now on (`--trust-checkpoints`)."""
    global _TRUSTED
    _TRUSTED = True


def load(path, **kwargs):
    """torch.load(path) that builds tensors, containers and ALLOWED types only; anything else is a
    UserError naming the file and the type, before any of it is built."""
    if _TRUSTED:
        return torch.load(path, weights_only=False, **kwargs)
    try:
        with torch.serialization.safe_globals(allowed()):
            return torch.load(path, weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise UserError(f"refused to load {path}: {_culprit(e)}, which no checkpoint of DeepSpeed or this trainer "
                        "holds; unpickling it could run code from the file. If you trust where the file comes from, "
                        "pass --trust-checkpoints (`python -m trainer.cli --trust-checkpoints COMMAND ...`, or to "
                        "tools/zero_to_fp32.py): full pickle, which runs whatever the file carries") from None


def _culprit(error: Exception) -> str:
    """What torch's restricted unpickler stopped at: a global the file names, or a type it builds."""
    found = re.search(r"GLOBAL ([\w.]+)|but got <class '([\w.]+)'>", str(error))
    if found:
        return f"it needs {found.group(1) or found.group(2)}"
    return f"it is not a plain checkpoint ({str(error).splitlines()[0]})"


_checked = set()  # (path, size, mtime) of files that passed: a resume reads the same checkpoint twice


def checkpoint_files(ckpt) -> list[Path]:
    """Every .pt file under a checkpoint directory, through symlinked folders too (Path.rglob does not follow
    them, and DeepSpeed's loaders would read what they point to)."""
    found = []
    for folder, _, names in os.walk(ckpt, followlinks=True):
        found += [Path(folder) / name for name in names if name.endswith(".pt")]
    return sorted(found)


def check_checkpoint(ckpt) -> None:
    """Every .pt file in a checkpoint directory (its universal copy and RNG states included) through `load`,
    memory-mapped, before DeepSpeed's unrestricted loaders read them."""
    if _TRUSTED:
        return
    for path in checkpoint_files(ckpt):
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _checked:
            continue
        try:
            load(path, map_location="cpu", mmap=True)
        except RuntimeError:  # not a zip archive (an old torch.save format): mmap cannot map it
            load(path, map_location="cpu")
        _checked.add(key)
