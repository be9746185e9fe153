"""Checkpoint layouts: which ZeRO stage, precision, offload and rank count a checkpoint was written
under, and what it takes to resume it under another one.

The same layout loads natively. Another one goes through DeepSpeed's own universal checkpoint
(`ds_to_universal --inject_missing_state`, made once by rank 0 and cached in `step_N/universal/`)
and `checkpoint.load_universal`: any rank count, ZeRO-1 <-> ZeRO-2, ZeRO-3 <-> ZeRO-3, precision and
offload changes. ZeRO-0 state is not partitioned, so it moves to another rank count as it is, but
DeepSpeed has no universal path into or out of it; nor does its universal checkpoint cross between
ZeRO-1/2 and ZeRO-3. Those are refused before anything is loaded.
"""
import contextlib
import io
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from trainer import dist
from trainer.checkpoint import muon_universal, safe_load
from trainer.checkpoint.store import UNIVERSAL, is_complete, read_marker, write_marker
from trainer.engine.ds_config import offloads_optimizer, optimizer_type, precision, zero_stage
from trainer.errors import UserError, describe


def engine_layout(engine) -> dict:
    """How a live engine partitions its state: what a checkpoint must match to load natively."""
    precision = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    return {"world_size": dist.world_size(), "zero_stage": int(engine.zero_optimization_stage()),
            "precision": precision, "offload": bool(engine.zero_use_cpu_optimizer()),
            "optimizer": optimizer_kind(engine.optimizer_name())}


def config_layout(world_size: int, ds_config: dict) -> dict:
    """The same, for an engine about to be built from `ds_config` (read before deepspeed.initialize)."""
    return {"world_size": world_size, "zero_stage": zero_stage(ds_config), "precision": precision(ds_config),
            "offload": offloads_optimizer(ds_config), "optimizer": optimizer_kind(optimizer_type(ds_config))}


def optimizer_kind(name) -> str:
    """muon, or adamw for every other optimizer type: what decides whether a checkpoint's optimizer state can
    load (Muon's groups hold a momentum where Adam's hold two moments)."""
    return "muon" if str(name).lower() == "muon" else "adamw"


def _describe(layout: dict) -> str:
    offload = " + CPU offload" if layout.get("offload") else ""
    ranks = layout.get("world_size")
    plural = "s" * (ranks != 1)
    return f"ZeRO-{layout.get('zero_stage')} {layout.get('precision', '?')}{offload} on {ranks} rank{plural}"


def saved_layout(ckpt: Path) -> dict:
    """The layout a checkpoint was written under, from its marker (older markers lack precision/offload, and
    the optimizer: they were all Adam-type)."""
    marker = read_marker(ckpt)
    layout = {k: marker[k] for k in ("world_size", "zero_stage", "precision", "offload") if k in marker}
    return {**layout, "optimizer": optimizer_kind(marker.get("optimizer", "adamw"))}


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
    saved, now = saved_layout(ckpt), config_layout(world_size, ds_config)
    if saved["optimizer"] != now["optimizer"]:
        raise UserError(f"checkpoint {ckpt.name} was trained with the {saved['optimizer']} optimizer and this run's "
                        f"DeepSpeed config uses {now['optimizer']}: their states do not convert. Resume with a "
                        f"{saved['optimizer']} config, or start a new run from its weights with --init-from {ckpt}")
    if not needs_conversion(ckpt, world_size, ds_config):
        return ckpt, ds_config
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        return _prepare_stage0(ckpt, saved, now, ds_config)
    if (saved["zero_stage"] == 3) != (now["zero_stage"] == 3):
        # DeepSpeed 0.19 writes the universal checkpoint of a ZeRO-1/2 run in a form its ZeRO-3 loader does
        # not read (it looks for zero_pp_rank_0_*_model_states.pt, then a per-step optimizer_state_dict),
        # and the reverse fails the same way; ZeRO-3 to ZeRO-3 on another rank count works.
        raise UserError(f"checkpoint {ckpt.name} was saved under {_describe(saved)} and cannot be resumed under "
                        f"{_describe(now)}: DeepSpeed's universal checkpoint does not carry a run across the "
                        f"ZeRO-3 boundary (ZeRO-1/2 <-> ZeRO-3). Resume with a "
                        f"{'ZeRO-3' if saved['zero_stage'] == 3 else 'ZeRO-1 or ZeRO-2'} config (any rank count), or "
                        f"start a new run from its weights with --init-from {ckpt}")
    universal = convert_to_universal(ckpt)
    dist.print0(f"checkpoint {ckpt.name} was saved under {_describe(saved)}, resuming under {_describe(now)}: "
                f"loading DeepSpeed's universal checkpoint {universal}")
    if saved["optimizer"] == "muon":
        dist.print0("note: Muon's momentum restarts from zero (DeepSpeed's universal checkpoint has no place for it; "
                    "the weights, AdamW's moments and the step carry over)")
    ds_config = json.loads(json.dumps(ds_config))
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return universal, ds_config


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
    try:
        safe_load.check_checkpoint(ckpt)  # before ds_to_universal, which unpickles without restriction
    except UserError as e:
        return e.message
    muon = saved_layout(ckpt)["optimizer"] == "muon"
    source = muon_universal.placeholder_copy(ckpt) if muon else ckpt
    args = Namespace(input_folder=str(source), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
                     keep_temp_folder=False, strict=True, inject_missing_state=True)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # its progress goes to the log, not to our stdout / --json
            ds_to_universal.main(args)
        if muon:
            muon_universal.drop_placeholders(tmp, read_marker(ckpt)["model_config"])
    except Exception as e:  # DeepSpeed raises asserts and bare exceptions here: turn them into one line
        shutil.rmtree(tmp, ignore_errors=True)
        return (f"DeepSpeed could not convert {ckpt} to a universal checkpoint ({describe(e)}); resume it with "
                "the ZeRO config and rank count it was saved under")
    finally:
        if muon:
            shutil.rmtree(source, ignore_errors=True)
    (tmp / "convert.log").write_text(log.getvalue())
    # ds_to_universal names the output folder in a `latest_universal` file beside it; ours is found by path.
    (ckpt / "latest_universal").unlink(missing_ok=True)
    tmp.rename(out)
    write_marker(out, {"source": ckpt.name, **saved_layout(ckpt)})
    return None


