"""Non-finite steps: skip, then roll back past the bad data, then stop.

DeepSpeed skips an update whose gradients are not finite, on every rank, and leaves weights and
optimizer alone; the step still counts (and uses up its step of the LR schedule, trainer/train/optim.py).
After `--max-skips` such steps in a row the run reloads the newest sound checkpoint at or before
the current step and moves the data cursor past everything read since, the offending window
included (PaLM's recipe for loss spikes: restart a little earlier and skip the batches around the
spike). After `--max-rollbacks` rollbacks in one invocation it stops with an error; every
checkpoint stays intact.
"""
from pathlib import Path

from trainer import dist
from trainer.checkpoint import contents
from trainer.errors import UserError
from trainer.train.state import TrainState

ADVICE = "Lower --lr, raise --warmup-steps or check the data, then resume"


def roll_back(checkpointer, engine, state: TrainState, max_skips: int, max_rollbacks: int) -> Path:
    """Reload the last good checkpoint and skip the data read since; updates `state` in place (step and
    tokens from the checkpoint, the cursor stays past the offending window, rollbacks + 1)."""
    skips = state.skips_in_a_row
    what = (f"{skips} consecutive steps had non-finite loss or gradients (limit --max-skips {max_skips})")
    if state.rollbacks >= max_rollbacks:
        raise UserError(f"{what} after {state.rollbacks} rollback(s) (limit --max-rollbacks {max_rollbacks}); the "
                        f"last complete checkpoint is intact. {ADVICE}")
    try:
        ckpt, client = checkpointer.roll_back(engine, state.step)
    except UserError as e:
        raise UserError(f"{what} and {e.message}. {ADVICE}") from e
    dist.print0(f"rolled back to {ckpt.name} (rollback {state.rollbacks + 1} of at most {max_rollbacks}) after "
                f"{skips} non-finite steps in a row; skipping the data read since then, the offending batches "
                f"included (samples {client.get('cursor', 0)} to {state.cursor - 1}), so step "
                f"{int(client['step']) + 1} trains on sample {state.cursor} onwards")
    contents.rolled_back(state, client)
    state.rollbacks += 1
    state.skips_in_a_row = 0
    return ckpt
