"""Where inference commands (eval-ppl, eval-hellaswag, eval-harness, generate) run, and in what dtype.

torch.distributed is started only under a launcher (WORLD_SIZE > 1), for data-parallel evaluation;
a single process never imports DeepSpeed unless it loads a DeepSpeed checkpoint.
"""
import os
from typing import Optional

import torch

from trainer import dist
from trainer.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def setup_device(device: Optional[str] = None) -> torch.device:
    """This rank's device: `device` if given, else its GPU, else the CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from trainer.engine import build as engine

        engine.init_distributed()
    if device:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank())
    return torch.device("cpu")


def resolve_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """bfloat16 on GPU, float32 on CPU (a CPU without native bf16 emulates bf16 matmuls, far slower)."""
    if name is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype {name}: use one of {', '.join(DTYPES)}")
    return DTYPES[name]
