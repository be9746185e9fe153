"""Model files: `model.safetensors` + `config.json` (the ModelConfig), the format every tool shares.

safetensors refuses tensors that share memory, so a tied `lm_head.weight` is not written; load
re-ties it by building the model from its config and loading strictly.
"""
import dataclasses
import json
from pathlib import Path

import torch

from models.config import ModelConfig
from models.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def state_dict_for_saving(model: GPT) -> dict:
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save(model: GPT, directory) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state_dict_for_saving(model), str(directory / WEIGHTS), metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(dataclasses.asdict(model.config), indent=2))
    return directory


def read_config(directory) -> ModelConfig:
    return ModelConfig.from_dict(json.loads((Path(directory) / CONFIG).read_text()))


def load(directory, map_location="cpu") -> GPT:
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in (WEIGHTS, CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory} has no {name}; expected a model directory written by models.save "
                                    "or tools/zero_to_fp32.py")
    with torch.device("meta"):
        model = GPT(read_config(directory))
    state = load_file(str(directory / WEIGHTS), device=str(map_location))
    load_state(model, state)
    return model


def load_state(model: GPT, state: dict) -> None:
    """Strict load that accepts a state dict with or without the tied head."""
    if model.config.tie_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:
        raise ValueError(f"weights do not match the model config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    model.refresh_buffers()
