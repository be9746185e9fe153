"""trainer/train/hostmem.py: on glibc, large tensors freed by a training step are kept for the next one
instead of going back to the kernel (which made every CPU step page-fault its logits afresh)."""
import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import ctypes, os, sys
    import torch
    from trainer.train import hostmem

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "keep":
        assert hostmem.keep_freed_memory() is True
        assert hostmem.keep_freed_memory() is True  # idempotent
    elif sys.argv[1] == "opt-out":
        assert hostmem.keep_freed_memory() is False
    mapped_before = libc.mallinfo2().hblkhd
    big = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: above any mmap threshold glibc would pick
    mapped_while = libc.mallinfo2().hblkhd
    del big
    print(mapped_while - mapped_before, libc.mallinfo2().fordblks)
""")


def _probe(mode, **env):
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env})
    mapped, free_in_heap = map(int, out.stdout.split()[-2:])
    return mapped, free_in_heap


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_large_freed_tensors_stay_in_the_heap():
    mapped, free_in_heap = _probe("keep")
    assert mapped == 0                      # not a fresh mmap ...
    assert free_in_heap >= 64 << 20         # ... and after free it waits in the heap for the next step


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_default_malloc_maps_large_tensors_and_the_opt_out_keeps_it():
    assert _probe("default")[0] >= 64 << 20  # what the step paid for every step before
    mapped, _ = _probe("opt-out", GPT_TRAINER_SYSTEM_MALLOC="1")
    assert mapped >= 64 << 20


def test_a_gpu_device_leaves_malloc_alone():
    import torch

    from trainer.train import hostmem

    assert hostmem.keep_freed_memory(torch.device("cuda", 0)) is False
