"""What a checkpoint holds besides DeepSpeed's own state, and how it is saved and restored: the one place
that names it. Everything else asks this module.

DeepSpeed writes the weights, the optimizer state and its own bookkeeping (DEEPSPEED_KEYS) into the
checkpoint's files; the trainer adds its `client_state` to the model-states file and one RNG file per
rank. The client state (built by `client_state`, read back by `restore_train_state`):

  where the run is (TrainState)  step, cursor (the global sample cursor: the data order continues from it),
                                 tokens, trained_tokens (fine-tuning's scored targets), skipped_total and
                                 rollbacks (the non-finite-step guard's counts; a resume gets a fresh
                                 rollback budget)
  what the run is                train_config (the resolved TrainConfig: schedule, optimizer settings),
                                 model_config (the ModelConfig), tokenizer (its spec)
  the layout it ran under        world_size, zero_stage, global_batch, seq_len, total_steps (the schedule's end)
  the data source's own          template and sft (fine-tuning: its chat template and what made its examples)

RNG states (python, numpy, torch and CUDA generators) go to `rng/rank_R.pt` of each rank. The COMPLETE
marker repeats MARKER_KEYS of the client state (and the engine's layout and the file list) so that a
checkpoint can be judged without loading it.
"""
import dataclasses
import random
from pathlib import Path

import numpy as np
import torch

from trainer.train.state import TrainState

# Keys DeepSpeed itself writes into the model-states file; everything else there is the client state.
DEEPSPEED_KEYS = {"module", "buffer_names", "optimizer", "param_shapes", "frozen_param_shapes", "shared_params",
                  "frozen_param_fragments", "lr_scheduler", "data_sampler", "random_ltd", "skipped_steps",
                  "global_steps", "global_samples", "dp_world_size", "mp_world_size",
                  "checkpoint_parallel_dimensions", "ds_config", "ds_version", "sparse_tensor_module_names"}
MARKER_KEYS = ("global_batch", "seq_len", "tokens", "cursor", "model_config")
RNG_DIR = "rng"


def client_state(state: TrainState, *, train_config, model_config, tokenizer: str, world_size: int,
                 zero_stage: int, global_batch: int, seq_len: int, total_steps: int, data_state: dict) -> dict:
    """The client state of a checkpoint at `state` (see the module doc); `data_state` is the data source's own."""
    counts = {} if state.trained_tokens is None else {"trained_tokens": state.trained_tokens}
    return {"step": state.step, "cursor": state.cursor, "tokens": state.tokens, "skipped_total": state.skipped,
            "rollbacks": state.rollbacks, **counts,
            "train_config": train_config.to_dict(), "model_config": dataclasses.asdict(model_config),
            "tokenizer": tokenizer, "world_size": world_size, "zero_stage": zero_stage, "global_batch": global_batch,
            "seq_len": seq_len, "total_steps": total_steps, **data_state}


def restore_train_state(client: dict) -> TrainState:
    """Where a resumed run starts (the rollback budget is this invocation's, so it starts at 0)."""
    trained = client.get("trained_tokens")
    return TrainState(step=int(client.get("step", 0)), cursor=int(client.get("cursor", 0)),
                      tokens=int(client.get("tokens", 0)), skipped=int(client.get("skipped_total", 0)),
                      trained_tokens=None if trained is None else int(trained))


def rolled_back(state: TrainState, client: dict) -> None:
    """A rollback to the checkpoint `client`: its step and token counts; the cursor stays where it is (past the
    data that went wrong)."""
    state.step, state.tokens = int(client["step"]), int(client["tokens"])
    state.trained_tokens = client.get("trained_tokens", state.trained_tokens)


def marker_fields(client: dict) -> dict:
    return {k: client[k] for k in MARKER_KEYS if k in client}


def of_model_states(states: dict) -> dict:
    """The client state inside a loaded model-states file."""
    return {k: v for k, v in states.items() if k not in DEEPSPEED_KEYS}


# ---- RNG states ------------------------------------------------------------------------------------------

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


def rng_file(ckpt, rank: int) -> Path:
    return Path(ckpt) / RNG_DIR / f"rank_{rank}.pt"


def save_rng(ckpt, rank: int) -> None:
    path = rng_file(ckpt, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), path)
