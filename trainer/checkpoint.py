"""Checkpoints: save, find, resume (also under another ZeRO setup or rank count), consolidate.

Layout (DESIGN.md): RUN/checkpoints/step_NNNNNNN/ written by DeepSpeed's save_checkpoint, plus
  rng/rank_R.pt     every rank's RNG states (DeepSpeed writes client_state from one rank only)
  COMPLETE          JSON marker written last, after a barrier: only then does the checkpoint count;
                    it also records the layout the checkpoint was saved under (ranks, ZeRO stage,
                    precision, offload, global batch), readable before DeepSpeed starts
  universal/        a cached DeepSpeed universal checkpoint, made on first resume under another layout
RUN/checkpoints/latest names the newest complete checkpoint; it is replaced atomically after
the marker, so a crash at any moment leaves the previous complete checkpoint usable.
This module and trainer/engine.py are the only places that import deepspeed.
"""
import contextlib
import io
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer import dist
from trainer.errors import UserError

MARKER = "COMPLETE"
LATEST = "latest"
UNIVERSAL = "universal"  # cached universal copy inside a checkpoint dir (never matched by step_*)


def tag_for(step: int) -> str:
    return f"step_{step:07d}"


def checkpoints_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(ckpt: Path) -> bool:
    return (Path(ckpt) / MARKER).is_file()


def read_marker(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / MARKER).read_text())


def complete_checkpoints(run_dir) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if p.is_dir() and is_complete(p))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def engine_layout(engine) -> dict:
    """How a live engine partitions its state: what a checkpoint must match to load natively."""
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"world_size": dist.world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": precision, "offload": bool(engine.zero_use_cpu_optimizer())}


def config_layout(world_size: int, ds_config: dict) -> dict:
    """The same, for an engine about to be built from `ds_config` (read before deepspeed.initialize)."""
    from trainer import engine as ds_engine

    return {"world_size": world_size, "zero_stage": ds_engine.zero_stage(ds_config),
            "precision": ds_engine.precision(ds_config), "offload": ds_engine.offloads_optimizer(ds_config)}


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

    def save(state_dict, path: str):
        try:
            with open(path, "wb") as f:
                torch.save(state_dict, f, _use_new_zipfile_serialization=ce.zipfile_serialization)
        except RuntimeError as e:
            cause = e.__context__
            if isinstance(cause, OSError):
                raise OSError(cause.errno, cause.strerror, str(path)) from e
            raise

    ce.save = save
    ce._reports_write_errors = True


def save(engine, run_dir, step: int, client_state: dict, keep_last: int = 0) -> Path:
    """Write a checkpoint on all ranks; returns its directory once it is complete everywhere."""
    root = checkpoints_dir(run_dir)
    tag = tag_for(step)
    ckpt = root / tag
    if dist.is_main() and ckpt.exists():
        # A leftover from a crash during an earlier save of this same step: never half-trust it.
        shutil.rmtree(ckpt)
    dist.barrier()
    _report_write_errors(engine)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    rng_dir = ckpt / "rng"
    rng_dir.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), rng_dir / f"rank_{dist.rank()}.pt")
    dist.barrier()
    if dist.is_main():
        marker = {"step": step, **engine_layout(engine),
                  **{k: client_state[k] for k in ("global_batch", "seq_len", "tokens", "cursor", "model_config")
                     if k in client_state},
                  "files": sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())}
        _atomic_write(ckpt / MARKER, json.dumps(marker, indent=1))
        _atomic_write(root / LATEST, tag + "\n")
        from trainer import zero_scripts  # ours over DeepSpeed's zero_to_fp32.py copies (tied embeddings)

        zero_scripts.write(root)
        if keep_last and keep_last > 0:
            # Only now, with the new checkpoint complete, may older complete ones go.
            for old in complete_checkpoints(run_dir)[:-keep_last]:
                (old / MARKER).unlink(missing_ok=True)  # first: a kill mid-delete leaves an incomplete dir
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return ckpt


def find_resume(run_dir, resume: str) -> Optional[Path]:
    """Which checkpoint to resume from: None for a fresh start, else a complete checkpoint dir."""
    if resume == "never":
        return None
    if resume != "auto":
        ckpt = Path(resume)
        if (ckpt / "checkpoints").is_dir():  # a run directory
            return find_resume(ckpt, "auto") or _missing(ckpt)
        if ckpt.name == "checkpoints" and ckpt.is_dir():  # a run's checkpoints dir
            return find_resume(ckpt.parent, "auto") or _missing(ckpt.parent)
        if not ckpt.is_dir():
            raise UserError(f"--resume {resume}: no such checkpoint directory")
        if ckpt.name == UNIVERSAL and is_complete(ckpt.parent):  # the cached copy: resume its source
            ckpt = ckpt.parent
        if not is_complete(ckpt):
            raise UserError(f"--resume {resume}: checkpoint is incomplete (no {MARKER} marker: the save was "
                            "interrupted); pick an earlier one or use --resume auto")
        return ckpt
    candidates = complete_checkpoints(run_dir)
    return candidates[-1] if candidates else None


def _missing(run_dir):
    raise UserError(f"--resume {run_dir}: that run has no complete checkpoint to resume from")


def _describe(layout: dict) -> str:
    offload = " + CPU offload" if layout.get("offload") else ""
    ranks = layout.get("world_size")
    return f"ZeRO-{layout.get('zero_stage')} {layout.get('precision', '?')}{offload} on {ranks} rank{'s' * (ranks != 1)}"


def saved_layout(ckpt: Path) -> dict:
    """The layout a checkpoint was written under, from its marker (older markers lack precision/offload)."""
    marker = read_marker(ckpt)
    return {k: marker[k] for k in ("world_size", "zero_stage", "precision", "offload") if k in marker}


def needs_conversion(ckpt: Path, world_size: int, ds_config: dict) -> bool:
    """True when DeepSpeed cannot load `ckpt` as is: rank count, ZeRO stage, precision or offload changed."""
    saved, now = saved_layout(ckpt), config_layout(world_size, ds_config)
    return any(saved[k] != now[k] for k in saved)


def prepare_resume(ckpt: Path, world_size: int, ds_config: dict, global_batch: Optional[int] = None
                   ) -> tuple[Path, dict]:
    """Before deepspeed.initialize: (directory to load from, ds_config to build the engine with).

    Same layout: the checkpoint itself and the config unchanged. Another rank count, ZeRO stage,
    precision or offload: a DeepSpeed universal checkpoint made once by rank 0 and cached in
    `ckpt/universal/`, and a config with `checkpoint.load_universal` on. Call on every rank.
    """
    ckpt = Path(ckpt)
    marker = read_marker(ckpt)
    if global_batch is not None and marker.get("global_batch") not in (None, global_batch):
        saved = marker["global_batch"]
        raise UserError(f"{ckpt} was trained with a global batch of {saved} sequences, this run would use "
                        f"{global_batch}; pass --global-batch {saved} so the data order and the optimizer "
                        "continue as before (accumulation adapts to the number of ranks)")
    if not needs_conversion(ckpt, world_size, ds_config):
        return ckpt, ds_config
    saved, now = saved_layout(ckpt), config_layout(world_size, ds_config)
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        return _prepare_stage0(ckpt, saved, now, ds_config)
    universal = convert_to_universal(ckpt)
    dist.print0(f"checkpoint {ckpt.name} was saved under {_describe(saved)}, resuming under {_describe(now)}: "
                f"loading DeepSpeed's universal checkpoint {universal}")
    ds_config = json.loads(json.dumps(ds_config))
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return universal, ds_config


def check_model(ckpt: Path, model_config: dict) -> None:
    """Refuse, naming the fields, to resume a checkpoint of another architecture into this model.

    DeepSpeed would otherwise fail deep inside load_state_dict with a tensor-shape message (or, for a
    change that keeps shapes such as `rope_theta`, silently train a different model).
    """
    ckpt = Path(ckpt)
    saved = read_marker(ckpt).get("model_config")
    run_file = ckpt.parent.parent / "model_config.json"
    if saved is None and run_file.is_file():  # checkpoints written before the marker recorded it
        saved = json.loads(run_file.read_text())
    if saved is None:
        return
    differ = [f"{k}={saved.get(k)!r} (this run: {v!r})" for k, v in model_config.items() if saved.get(k, v) != v]
    if differ:
        raise UserError(f"checkpoint {ckpt} holds another model: {', '.join(differ)}; resume with the model it was "
                        f"trained with, or start a new run from its weights with --init-from (same shapes only)")


def _prepare_stage0(ckpt: Path, saved: dict, now: dict, ds_config: dict) -> tuple[Path, dict]:
    """ZeRO-0 keeps the whole optimizer state on every rank, so only the rank count may change freely."""
    if saved["zero_stage"] == now["zero_stage"] == 0 and saved.get("precision", now["precision"]) == now["precision"]:
        dist.print0(f"checkpoint {ckpt.name} was saved under {_describe(saved)}, resuming under {_describe(now)}: "
                    "ZeRO-0 state is not partitioned, loading it as is")
        return ckpt, ds_config
    raise UserError(f"checkpoint {ckpt.name} was saved under {_describe(saved)} and cannot be resumed under "
                    f"{_describe(now)}: DeepSpeed's universal checkpoint does not cover ZeRO-0 (its optimizer "
                    f"state has no ZeRO shards). Resume with the checkpoint's own ZeRO stage "
                    f"({'ds_configs/zero0_bf16.json' if saved['zero_stage'] == 0 else 'a ZeRO-1/2/3 config'}), "
                    f"or start a new run from its weights with --init-from {ckpt}")


def convert_to_universal(ckpt: Path) -> Path:
    """DeepSpeed's ds_to_universal (--inject_missing_state) into ckpt/universal/, once: rank 0 converts, all wait."""
    ckpt = Path(ckpt)
    out = ckpt / UNIVERSAL
    error = None
    if dist.is_main() and not is_complete(out):
        error = _run_ds_to_universal(ckpt, out)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shared = [error]  # every rank must fail alike, or the others would hang in the next collective
        torch.distributed.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise UserError(error)
    return out


def _run_ds_to_universal(ckpt: Path, out: Path) -> Optional[str]:
    """Returns None on success, else a one-line reason; the work dir is removed on failure."""
    from argparse import Namespace

    from deepspeed.checkpoint import ds_to_universal

    tmp = ckpt / (UNIVERSAL + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    args = Namespace(input_folder=str(ckpt), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # its progress goes to the log, not to our stdout / --json
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed raises asserts and bare exceptions here: turn them into one line
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"DeepSpeed could not convert {ckpt} to a universal checkpoint ({type(e).__name__}: "
                f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'no message'}); resume it with the "
                "ZeRO config and rank count it was saved under")
    (tmp / "convert.log").write_text(log.getvalue())
    # ds_to_universal names the output folder in a `latest_universal` file beside it; ours is found by path.
    (ckpt / "latest_universal").unlink(missing_ok=True)
    tmp.rename(out)
    _atomic_write(out / MARKER, json.dumps({"source": ckpt.name, **saved_layout(ckpt)}, indent=1))
    return None


def load(engine, ckpt: Path, load_path: Optional[Path] = None) -> dict:
    """Load engine state (weights, optimizer, scheduler) and this rank's RNG; returns client_state.

    `load_path` is what prepare_resume returned (the checkpoint itself or its universal copy);
    RNG states always come from the original checkpoint.
    """
    ckpt = Path(ckpt)
    load_path = Path(load_path) if load_path is not None else ckpt
    try:
        _, client_state = engine.load_checkpoint(str(load_path.parent), tag=load_path.name,
                                                 load_optimizer_states=True, load_lr_scheduler_states=True)
    except Exception as e:  # e.g. a DP world-size mismatch that the marker did not predict (old checkpoints)
        if isinstance(e, UserError):
            raise
        raise UserError(f"DeepSpeed could not load checkpoint {ckpt} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[-1] if str(e).strip() else 'no message'}); resume it with "
                        "the ZeRO config and rank count it was saved under") from e
    if client_state is None:
        raise UserError(f"could not load checkpoint {ckpt}: DeepSpeed found no model states in it")
    rng_file = ckpt / "rng" / f"rank_{dist.rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        print(f"note: {ckpt} holds no RNG state for rank {dist.rank()} (saved on fewer ranks); "
              "this rank keeps its fresh seed", flush=True)
    return client_state


# ---- consolidation for inference (eval-ppl, generate, zero_to_fp32; owner: eval engineer) ----------------
MODEL_STATES_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
# Keys DeepSpeed itself writes into the model-states file; everything else there is our client_state.
_DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                   "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                   "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                   "checkpoint_parallel_dimensions", "ds_config", "ds_version", "sparse_tensor_module_names"}


def model_states_file(ckpt: Path) -> Optional[Path]:
    """The file holding client_state (and, below ZeRO-3, the module weights); None if not a DeepSpeed checkpoint."""
    return next((Path(ckpt) / n for n in MODEL_STATES_FILES if (Path(ckpt) / n).is_file()), None)


def consolidated_state_dict(ckpt: Path) -> tuple[dict, dict]:
    """(full fp32 state dict, client_state) of one DeepSpeed checkpoint dir, any ZeRO stage and rank count.

    Read directly from the ZeRO files in memory (no consolidation step on disk). Weights come from the
    fp32 master copies in the optimizer shards when there are any (ZeRO 1-3, bf16 ZeRO-0); fp32 ZeRO-0
    keeps the full weights in the module state itself. A tied lm_head comes back as an alias of the
    embedding it shares.
    """
    import contextlib
    import sys

    ckpt = Path(ckpt)
    states_file = model_states_file(ckpt)
    if states_file is None:
        raise UserError(f"{ckpt} is not a DeepSpeed checkpoint (none of {', '.join(MODEL_STATES_FILES)} in it)")
    states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
    client_state = {k: v for k, v in states.items() if k not in _DEEPSPEED_KEYS}
    if any(ckpt.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; keep stdout for results / --json
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        state.update(_zero0_fp32_master(states, client_state) or {})
    for alias, source in (states.get("shared_params") or {}).items():
        if alias not in state and source in state:
            state[alias] = state[source]
    return state, client_state


def _zero0_fp32_master(states: dict, client_state: dict) -> Optional[dict]:
    """ZeRO-0 bf16/fp16 keeps the fp32 master weights as one flat tensor per optimizer param group
    (FP16_Optimizer's fp32_groups_flat), not in the 16-bit module weights: unflatten them by the
    parameter order of trainer.optim.param_groups, which built those groups. None if that does not fit."""
    flats = (states.get("optimizer") or {}).get("fp32_groups_flat")
    if not flats or "model_config" not in client_state:
        return None
    import models
    from trainer.optim import param_groups

    with torch.device("meta"):
        model = models.GPT(models.ModelConfig(**client_state["model_config"]))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [g for g in param_groups(model, 0.0)]
    if len(groups) != len(flats):
        return None
    out = {}
    for group, flat in zip(groups, flats):
        offset = 0
        for param in group["params"]:
            n = param.numel()
            if offset + n > flat.numel():
                return None
            out[names[id(param)]] = flat[offset:offset + n].view(param.shape).float().clone()
            offset += n
        if offset != flat.numel():
            return None
    for name, tensor in model.state_dict(keep_vars=True).items():  # tied aliases (lm_head) follow their source
        if name not in out and names.get(id(tensor)) in out:
            out[name] = out[names[id(tensor)]]
    return out


# ---- locating and checking a checkpoint for export (tools/zero_to_fp32.py) ------------------------------

def resolve_checkpoint(path, tag: Optional[str] = None) -> Path:
    """A checkpoint dir from a run dir (newest complete one, or --tag), a checkpoints/ dir, or the dir itself.

    TAG is a directory name (step_0000100) or a step number (100).
    """
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{path}: no such directory (expected a run directory or a checkpoint directory)")
    root = checkpoints_dir(p) if (p / "checkpoints").is_dir() else p if not model_states_file(p) else None
    if root is None:  # a checkpoint dir itself
        if tag is not None:
            raise UserError(f"--tag {tag} given but {path} is already a checkpoint directory; pass its run directory")
        return p
    if tag is not None:
        name = tag_for(int(tag)) if str(tag).isdigit() else str(tag)
        ckpt = root / name
        if not ckpt.is_dir():
            have = ", ".join(sorted(q.name for q in root.glob("step_*"))) or "none"
            raise UserError(f"--tag {tag}: {ckpt} does not exist (checkpoints there: {have})")
        return ckpt
    complete = sorted(q for q in root.glob("step_*") if q.is_dir() and is_complete(q))
    if complete:
        return complete[-1]
    latest = root / LATEST  # a DeepSpeed checkpoint root written by another program
    if latest.is_file() and (root / latest.read_text().strip()).is_dir():
        return root / latest.read_text().strip()
    raise UserError(f"{path} holds no complete checkpoint (none of its step_* dirs has a {MARKER} marker)")


def check_shards(ckpt: Path) -> dict:
    """Refuse a partial checkpoint in plain words; returns the marker (or {} for a foreign DeepSpeed checkpoint)."""
    ckpt = Path(ckpt)
    states_file = model_states_file(ckpt)
    if states_file is None:
        raise UserError(f"{ckpt} is not a DeepSpeed checkpoint: it has no mp_rank_00_model_states.pt "
                        "(was the save interrupted before any file was written?)")
    marker = read_marker(ckpt) if is_complete(ckpt) else {}
    if marker:
        missing = [f for f in marker.get("files", []) if not (ckpt / f).is_file()]
        if missing:
            raise UserError(f"checkpoint {ckpt} is damaged: {len(missing)} of its {len(marker['files'])} files are "
                            f"gone (e.g. {missing[0]}); use another checkpoint")
        return marker
    states = torch.load(states_file, map_location="cpu", weights_only=False, mmap=True)
    expected = int(states.get("dp_world_size") or 1)
    shards = sorted(ckpt.glob("*optim_states.pt"))
    if shards and len(shards) != expected:
        raise UserError(f"checkpoint {ckpt} is incomplete: it was saved by {expected} ranks, so it needs {expected} "
                        f"optimizer shard files (*optim_states.pt), but only {len(shards)} are there; the save was "
                        "interrupted. Use an earlier checkpoint")
    if (ckpt / "rng").is_dir():  # one of ours without its marker: DeepSpeed may still have been writing
        raise UserError(f"checkpoint {ckpt} is incomplete: it has no {MARKER} marker (the save was interrupted); "
                        "use an earlier checkpoint")
    return marker
