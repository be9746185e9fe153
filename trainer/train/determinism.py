"""--deterministic: a run whose every step can be repeated bit for bit, on a GPU too.

On a CPU the trainer's steps are deterministic already (a resumed run continues bitwise). On a GPU
several kernels are not by default: atomic adds in the embedding and attention backward passes,
cuBLAS's workspace reuse, cuDNN's autotuner. This mode turns on torch's deterministic algorithms
(deterministic kernels where torch has them, an error naming the op where it has none), a fixed cuBLAS
workspace, cuDNN without autotuning, and keeps SDPA to its flash kernel (whose backward torch then runs
deterministically) and the math kernel; document masking uses SDPA's mask rather than FlexAttention,
and torch.compile is off unless asked for. DeepSpeed's ZeRO reductions run in a fixed bucket order
with a fixed NCCL algorithm choice for a given setup, which needs nothing more.
"""
import os

import torch

from trainer.errors import UserError

NOT_DETERMINISTIC = "does not have a deterministic implementation"


def enable() -> None:
    """Called first thing in a run's set-up: cuBLAS reads its workspace setting when it starts."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if torch.cuda.is_available():
        torch.backends.cuda.enable_mem_efficient_sdp(False)
        torch.backends.cuda.enable_cudnn_sdp(False)


def explain(error: BaseException):
    """A UserError for torch's "no deterministic implementation" error, or None for any other error."""
    text = str(error)
    if NOT_DETERMINISTIC not in text:
        return None
    op = text.split(NOT_DETERMINISTIC)[0].strip()
    return UserError(f"--deterministic: {op} has no deterministic implementation in torch {torch.__version__}, so "
                     "this run cannot repeat bit for bit; run without --deterministic (same data order, RNG, "
                     "optimizer and schedule state; GPU steps then differ within run-to-run noise)", every_rank=True)
