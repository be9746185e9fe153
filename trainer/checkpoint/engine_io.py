"""Writing and reading one checkpoint through a live DeepSpeed engine.

A save writes DeepSpeed's shards and each rank's RNG states, then, after every rank finished, the
COMPLETE marker (the layout, data cursor and file list), then `latest`, and only then prunes older
checkpoints. A load restores weights, optimizer and RNG, and puts DeepSpeed's CPU Adam back in the
state an uninterrupted process would have (see `_replay_cpu_adam_steps`), so a resumed run
continues bitwise.
"""
import shutil
from pathlib import Path
from typing import Optional

import torch

from trainer import dist
from trainer.checkpoint import contents, safe_load, zero_scripts
from trainer.checkpoint.layout import engine_layout
from trainer.checkpoint.store import checkpoints_dir, complete_checkpoints, prune, set_latest, tag_for, write_marker
from trainer.errors import UserError, describe



def save(engine, run_dir, step: int, client_state: dict, keep_last: int = 0) -> Path:
    """Write checkpoint `step` on all ranks; returns its directory once it is complete everywhere.

    A full disk or an unwritable directory becomes one UserError naming the checkpoint that is still
    intact. Every rank raises its own; a rank whose writes succeeded waits in the next collective until
    the launcher sees the failed rank exit and stops it.
    """
    try:
        return _write(engine, run_dir, step, client_state, keep_last)
    except OSError as e:
        intact = next((c.name for c in reversed(complete_checkpoints(run_dir)) if c.name != tag_for(step)), None)
        where = e.filename or checkpoints_dir(run_dir)
        raise UserError(f"rank {dist.rank()} could not write checkpoint {tag_for(step)} "
                        f"({e.strerror or type(e).__name__}: {where}); free disk space or fix the permissions of "
                        f"{checkpoints_dir(run_dir)}, then resume: "
                        + (f"{intact} is complete and intact" if intact else "no earlier checkpoint exists")) from e


def _write(engine, run_dir, step: int, client_state: dict, keep_last: int) -> Path:
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main() and ckpt.exists():
        # A leftover from a crash during an earlier save of this same step: never half-trust it.
        shutil.rmtree(ckpt)
    dist.barrier()
    _report_write_errors(engine)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    contents.save_rng(ckpt, dist.rank())
    dist.barrier()
    if dist.is_main():
        marker = {"step": step, **engine_layout(engine),
                  **contents.marker_fields(client_state),
                  "files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())}
        write_marker(ckpt, marker)
        set_latest(run_dir, tag)
        prune(run_dir, keep_last, step)  # only now, with the new checkpoint complete, may older ones go
        zero_scripts.write(root)  # ours over DeepSpeed's zero_to_fp32.py copies (they fail on tied embeddings)
    dist.barrier()
    return ckpt


def _report_write_errors(engine) -> None:
    """Make DeepSpeed's torch.save writes fail with an OSError naming the file and the cause.

    torch.save to a path writes through a C++ stream, so a full disk or a file-size limit surfaces as
    a bare RuntimeError ("unexpected pos ..."). Writing through a Python file object keeps the
    OSError (errno, "No space left on device") as the RuntimeError's context; we re-raise that.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if type(ce) is not TorchCheckpointEngine or getattr(ce, "_reports_write_errors", False):
        return  # another engine (Nebula, async) writes its own way

    def save_state(state_dict, path: str):
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=ce.zipfile_serialization)
        except RuntimeError as e:
            cause = e.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, str(path)) from e
            raise

    ce.save = save_state
    ce._reports_write_errors = True


def load(engine, ckpt, load_path: Optional[Path] = None) -> dict:
    """Load engine state (weights, optimizer) and this rank's RNG; returns the client_state.

    `load_path` is what layout.prepare_resume returned (the checkpoint itself or its universal copy);
    RNG states always come from the original checkpoint.
    """
    ckpt = Path(ckpt)
    load_path = Path(load_path) if load_path is not None else ckpt
    safe_load.check_checkpoint(ckpt)  # DeepSpeed's engine unpickles without restriction
    try:
        _, client_state = engine.load_checkpoint(str(load_path.parent), tag=load_path.name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    except UserError:
        raise
    except Exception as e:  # e.g. a DP world-size mismatch that the marker did not predict (old checkpoints)
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt} ({describe(e)}); resume it with the ZeRO "
                        "config and rank count it was saved under") from e
    if client_state is None:
        raise UserError(f"could not load checkpoint {ckpt}: DeepSpeed found no model states in it")
    rng_file = contents.rng_file(ckpt, dist.rank())
    if rng_file.is_file():
        contents.set_rng_state(safe_load.load(rng_file))
    else:
        print(f"note: {ckpt} holds no RNG state for rank {dist.rank()} (saved on fewer ranks); "
              "this rank keeps its fresh seed", flush=True)
    _replay_cpu_adam_steps(engine)
    return client_state


def _base_optimizer(engine):
    """The torch optimizer under DeepSpeed's ZeRO / mixed-precision wrappers."""
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _replay_cpu_adam_steps(engine) -> None:
    """Bring DeepSpeed's CPU Adam kernels to the state an uninterrupted process has at this step.

    DeepSpeed's C++ Adam for CPUs (FusedAdam on the CPU accelerator, DeepSpeedCPUAdam for ZeRO-Offload)
    keeps beta1^t and beta2^t for its bias correction in an object that lives as long as the process,
    and advances them with one float multiplication per step; a process that starts at step t instead
    computes them with pow(beta, t), which differs in the last bits. The bias correction, and so every
    update after a resume, then differs from the uninterrupted run's in the last bit (the fp32 master
    weights drift apart a few steps later). Calling the kernel once per completed step on empty
    tensors rebuilds the same running product. GPU FusedAdam and torch's AdamW compute the bias
    correction from the step each time: nothing to do. DeepSpeed's Muon runs such an Adam for its
    non-Muon groups (`aux_optimizer`, sharing Muon's state dict): that one is replayed the same way.
    """
    base = _base_optimizer(engine)
    groups = base.param_groups
    aux = getattr(base, "aux_optimizer", None)
    if aux is not None:
        groups = [g for g in base.param_groups if not g.get("use_muon")]
        base = aux
    steps = [int(s["step"]) for s in base.state.values() if isinstance(s, dict) and "step" in s]
    if not steps or not groups:
        return
    update = _cpu_adam_kernel(base)
    if update is None:
        return
    group = groups[0]
    for step in range(1, max(steps) + 1):
        update(step, group)


def _cpu_adam_kernel(base):
    """A function (step, group) that advances the CPU Adam kernel's running beta powers, or None."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    empty = torch.zeros(0)
    if isinstance(base, DeepSpeedCPUAdam):
        def update(step, group):
            base.ds_opt_adam.adam_update(base.opt_id, step, group["lr"], group["betas"][0], group["betas"][1],
                                         group["eps"], group["weight_decay"], group["bias_correction"],
                                         empty, empty, empty, empty)
        return update
    if isinstance(base, FusedAdam) and base._dummy_overflow_buf.device.type == "cpu":
        def update(step, group):
            base.multi_tensor_adam(2048, base._dummy_overflow_buf, [[empty], [empty], [empty], [empty]],
                                   group["lr"], group["betas"][0], group["betas"][1], group["eps"], step,
                                   base.adam_w_mode, int(group["bias_correction"]), group["weight_decay"])
        return update
    return None
