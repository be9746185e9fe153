"""Rank and world helpers that work with or without torch.distributed being initialised.

Launchers (deepspeed, torchrun) set RANK / WORLD_SIZE / LOCAL_RANK in the environment; a plain
`python` process has none, and DeepSpeed would then try MPI discovery, so `ensure_dist_env` fills
in single-process defaults with a free port.
"""
import os
import socket

import torch


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only (flushing, so launcher logs interleave sensibly)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_dist_env() -> None:
    """Give a plain single-process run the variables a launcher would have set."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def rank_share(n: int, rank: int, world: int) -> list:
    """The items 0..n-1 this rank handles (round robin), padded with None to ceil(n / world) entries.

    Every rank must run the same number of forward passes: under ZeRO-3 each forward gathers the
    parameters collectively, and a rank with one forward more than the others would wait forever.
    A None entry is a forward on some real input whose result the caller discards.
    """
    per_rank = -(-n // world)
    return [i if i < n else None for i in range(rank, per_rank * world, world)]


def _several_ranks() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (a no-op on one rank)."""
    if _several_ranks():
        torch.distributed.all_reduce(tensor)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (a new fp32 tensor)."""
    out = all_reduce_sum(tensor.detach().float().clone())
    return out / world_size() if _several_ranks() else out


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks (a new fp32 tensor)."""
    out = tensor.detach().float().clone()
    if _several_ranks():
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank src's `obj` on every rank (pickled; for things made once, such as tokenized data)."""
    if not _several_ranks():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
