"""Keep freed host memory for reuse when computing on the CPU: the counterpart of CUDA's caching allocator.

glibc's malloc serves every large allocation with a fresh mmap and hands it back to the kernel on
free. A training step allocates and frees the same large tensors every step (the tokens x vocab
logits, their fp32 copy, their gradient), so without a cache each step pays a page fault and a
zero-fill for every 4 KiB of them (the README's Performance section has the figures). Telling malloc
never to mmap and never to trim the heap below 2 GiB keeps freed blocks for the next step, as
PyTorch's CUDA allocator does on GPU. (Intel's CPU tuning guide reaches the same by preloading
jemalloc or tcmalloc; this needs no extra library.) The price is that the process keeps its peak
host memory until it exits, which is what a training process does anyway.
"""
import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the most it can say
OPT_OUT = "GPT_TRAINER_SYSTEM_MALLOC"  # =1 leaves malloc as it is

_applied = None


def keep_freed_memory(device=None) -> bool:
    """Make glibc's malloc cache freed memory in this process when computing on `device` (None: the CPU).
    True when it did (once per process); False for a GPU device (its allocator caches already), with
    another C library (macOS, musl: nothing to do) or when GPT_TRAINER_SYSTEM_MALLOC=1."""
    global _applied
    if device is not None and device.type != "cpu":
        return False
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(OPT_OUT) == "1" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _applied
