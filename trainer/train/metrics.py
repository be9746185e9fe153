"""Throughput, MFU, memory, and the run's metric writers (metrics.jsonl, TensorBoard, W&B).

MFU = achieved model FLOP/s (model.flops_per_token x tokens/s) over the peak of the devices.
The peak comes from a table of known GPUs (dense bf16 tensor-core figures from the vendors'
datasheets), or on CPU from a bf16 matmul measured in this process, so CPU MFU is honest
about what this machine can actually do. `peak_flops()` says which one it used.
"""
import json
import os
import time
from pathlib import Path
from typing import Optional

import torch

# Dense (no sparsity) bf16 peak TFLOP/s per device, from NVIDIA / AMD datasheets.
GPU_PEAK_TFLOPS = {
    "H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0,
    "A100": 312.0, "A800": 312.0, "A10G": 70.0, "A10": 125.0, "A6000": 155.0, "A40": 150.0,
    "L40S": 362.0, "L40": 181.0, "L4": 121.0,
    "RTX 4090": 165.0, "RTX 4080": 97.0, "RTX 3090": 71.0, "RTX 3080": 59.5,
    "V100": 125.0, "T4": 65.0, "MI300X": 1307.0, "MI250X": 383.0,
}


def gpu_peak_tflops(name: str) -> Optional[float]:
    # Longest key first so "RTX 4090" wins over shorter names it contains.
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return GPU_PEAK_TFLOPS[key]
    return None


def measure_matmul_tflops(dtype=torch.bfloat16, size: int = 1024, seconds: float = 0.5) -> float:
    """Best sustained matmul TFLOP/s of this process on CPU, with its current thread count.

    `torch.mm` in each operand layout and `F.linear` are timed and the fastest counts: on CPUs
    without native bf16 they take different kernels, an order of magnitude apart in bf16, and the peak
    must be the best this machine can do, or MFU would read above 100%.
    """
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    best = 0.0
    for op in (torch.mm, lambda x, y: torch.mm(x, y.t()), lambda x, y: torch.mm(x.t(), y),
               torch.nn.functional.linear):
        op(a, b)  # warm-up: oneDNN picks its kernel on the first call
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / 2:
            t0 = time.perf_counter()
            for _ in range(2):
                op(a, b)
            best = max(best, 2 * 2 * size**3 / (time.perf_counter() - t0))
    return best / 1e12


def peak_flops(dtype=torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure came from)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        tflops = gpu_peak_tflops(name)
        if tflops is not None:
            return tflops * 1e12, f"{name} datasheet bf16 peak {tflops:.0f} TFLOP/s"
        return measure_cuda_matmul_tflops() * 1e12, f"{name} measured bf16 matmul peak"
    tflops = measure_matmul_tflops(dtype)
    return tflops * 1e12, f"CPU measured {str(dtype).replace('torch.', '')} matmul peak {tflops * 1e3:.1f} GFLOP/s " \
                          f"({torch.get_num_threads()} threads)"


def measure_cuda_matmul_tflops(size: int = 8192, iters: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return iters * 2 * size**3 / (time.perf_counter() - t0) / 1e12


def memory_gb() -> Optional[float]:
    """Peak accelerator memory of this process in GB (2**30), or None on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return None


def _append_lines(path: Path):
    """Open a JSON-lines file for appending, line-buffered; a last line cut short by a kill is ended first, so
    the next record starts on a line of its own."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            cut = f.read(1) != b"\n"
        if cut:
            with open(path, "a") as f:
                f.write("\n")
    return open(path, "a", buffering=1)


class MetricsWriter:
    """Rank-0 writer: one JSON object per line in RUN/metrics.jsonl (per-step metrics) and RUN/events.jsonl
    (what happened to the run), plus TensorBoard and optional W&B."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = True, wandb_project: Optional[str] = None,
                 config: Optional[dict] = None):
        self.enabled = enabled
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = _append_lines(self.path)
        self.events = _append_lines(Path(run_dir) / "events.jsonl")
        self.lines = sum(1 for _ in open(self.path))  # complete records before this run's first
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))
        if wandb_project:
            import wandb  # optional dependency: pip install gpt-trainer[wandb]

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config or {},
                                    name=Path(run_dir).name, resume="allow")

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and value is not None:
                if self.tb is not None:
                    group = "eval" if key.startswith(("val", "hellaswag")) else "train"
                    self.tb.add_scalar(f"{group}/{key}", value, step)
        if self.tb is not None:
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=step)

    def event(self, record: dict) -> None:
        """One line in RUN/events.jsonl: what happened to the run (start or resume, save, rollback)."""
        if self.enabled:
            self.events.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}) + "\n")

    def close(self) -> None:
        if not self.enabled:
            return
        self.file.close()
        self.events.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
