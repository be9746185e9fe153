"""One checkpoint -> one full fp32 state dict, for export, evaluation, generation and --init-from.

The weights are the fp32 master copies DeepSpeed keeps in the optimizer shards (ZeRO 1-3, and the
flat groups of bf16/fp16 ZeRO-0), gathered with DeepSpeed's own zero_to_fp32 in lazy mode (one
tensor in memory at a time); an fp32 ZeRO-0 checkpoint keeps them in the module state itself. A
tied lm_head comes back as an alias of the embedding it shares. Also here: the one answer to "is
this the same architecture?".
"""
import contextlib
import sys
from pathlib import Path
from typing import Optional

import torch

from trainer.checkpoint import contents, safe_load
from trainer.checkpoint.store import model_states_file, read_marker
from trainer.errors import UserError

# ModelConfig fields that are training settings or initialisation, not architecture: they may differ between a
# checkpoint and the model it is loaded into.
NOT_ARCHITECTURE = ("dropout", "zero_init_proj")


def architecture_differences(saved: dict, mine: dict, tolerate: tuple = ()) -> list[tuple]:
    """(field, saved value, my value) for every architecture field that differs. A field the saved config
    predates had its ModelConfig default then (a model option added later, such as qk_norm, was off); one
    without a fixed default (derived in ModelConfig) counts as equal."""
    import dataclasses

    import models

    defaults = {f.name: f.default for f in dataclasses.fields(models.ModelConfig)
                if f.default is not dataclasses.MISSING and f.default is not None}
    skip = set(NOT_ARCHITECTURE) | set(tolerate)
    was = {k: saved.get(k, defaults.get(k, v)) for k, v in mine.items()}
    return [(k, was[k], v) for k, v in mine.items() if k not in skip and was[k] != v]


def check_model(ckpt, model_config: dict) -> None:
    """Refuse, naming the fields, to resume a checkpoint of another architecture into this model.

    DeepSpeed would otherwise fail deep inside load_state_dict with a tensor-shape message (or, for a
    change that keeps shapes such as `rope_theta`, silently train a different model).
    """
    ckpt = Path(ckpt)
    saved = read_marker(ckpt).get("model_config")
    if saved is None:  # checkpoints written before the marker recorded it
        saved = client_state(ckpt).get("model_config")
    differ = architecture_differences(saved or {}, model_config)
    if differ:
        named = ", ".join(f"{k}={theirs!r} (this run: {mine!r})" for k, theirs, mine in differ)
        raise UserError(f"checkpoint {ckpt} holds another model: {named}; resume with the model it was "
                        f"trained with, or start a new run from its weights with --init-from (same shapes only)")


def _model_states(ckpt: Path) -> dict:
    states_file = model_states_file(ckpt)
    if states_file is None:
        raise UserError(f"{ckpt} is not a DeepSpeed checkpoint (no mp_rank_00_model_states.pt in it)")
    return safe_load.load(states_file, map_location="cpu", mmap=True)


def client_state(ckpt) -> dict:
    """What the trainer stored with the checkpoint: step, tokens, cursor, configs, tokenizer."""
    return contents.of_model_states(_model_states(Path(ckpt)))


def consolidated_state_dict(ckpt) -> tuple[dict, dict]:
    """(full fp32 state dict, client_state) of one DeepSpeed checkpoint dir, any ZeRO stage and rank count."""
    ckpt = Path(ckpt)
    states = _model_states(ckpt)
    client = contents.of_model_states(states)
    if any(ckpt.glob("*optim_states.pt")):
        safe_load.check_checkpoint(ckpt)  # DeepSpeed's zero_to_fp32 unpickles without restriction
        from trainer.engine.build import import_deepspeed

        import_deepspeed()  # first import with its logger on stderr: stdout carries results
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        with contextlib.redirect_stdout(sys.stderr):  # it prints progress; stdout is for results / --json
            lazy = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name, lazy_mode=True)
        state, seen = {}, {}
        for name, tensor in lazy.items():
            if id(tensor) in seen:  # a shared (tied) parameter: one tensor, two names
                state[name] = state[seen[id(tensor)]]
                continue
            seen[id(tensor)] = name
            state[name] = tensor.contiguous()
    else:
        state = {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
        state.update(_zero0_fp32_master(states, client) or {})
    for alias, source in (states.get("shared_params") or {}).items():
        if alias not in state and source in state:
            state[alias] = state[source]
    return state, client


def _zero0_fp32_master(states: dict, client: dict) -> Optional[dict]:
    """ZeRO-0 bf16/fp16 keeps the fp32 master weights in the optimizer state, not in the 16-bit module
    weights: one flat tensor per param group (FP16_Optimizer, DeepSpeed's wrapper around its fused Adam)
    or one tensor per parameter (FP16_UnfusedOptimizer, its wrapper around Muon), in the order of
    trainer.train.optim.param_groups, which built those groups. None if that does not fit."""
    optimizer = states.get("optimizer") or {}
    flats, per_param = optimizer.get("fp32_groups_flat"), optimizer.get("fp32_groups")
    if not (flats or per_param) or "model_config" not in client:
        return None
    import models
    from trainer.engine.ds_config import uses_muon
    from trainer.train.optim import param_groups

    with torch.device("meta"):
        model = models.GPT(models.ModelConfig.from_dict(client["model_config"]))
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, 0.0, muon=uses_muon(states.get("ds_config") or {}))
    stored = flats or per_param
    if len(groups) != len(stored):
        return None
    out = {}
    for group, tensors in zip(groups, stored):
        if flats:  # split the group's flat tensor at the parameters' sizes
            sizes = [p.numel() for p in group["params"]]
            if sum(sizes) != tensors.numel():
                return None
            tensors = tensors.split(sizes)
        if len(tensors) != len(group["params"]):
            return None
        for param, tensor in zip(group["params"], tensors):
            if tensor.numel() != param.numel():
                return None
            out[names[id(param)]] = tensor.reshape(param.shape).float().clone()
    for name, tensor in model.state_dict(keep_vars=True).items():  # tied aliases (lm_head) follow their source
        if name not in out and names.get(id(tensor)) in out:
            out[name] = out[names[id(tensor)]]
    return out
