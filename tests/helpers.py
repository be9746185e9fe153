"""Shared test helpers (imported by test modules; pytest puts tests/ on sys.path)."""
import contextlib
import os

import torch

import models


def random_model(**overrides) -> models.GPT:
    """A tiny byte-level model with norms and biases moved off their init values (so parity sees them),
    in eval mode, the same weights on every call."""
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=257, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(3.0)
    return model



LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def single_process_env():
    """os.environ without launcher variables for the duration: lm-eval's HF model (through accelerate) reads a
    LOCAL_RANK left by an in-process run as a distributed launch."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)
