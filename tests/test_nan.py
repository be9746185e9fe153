"""Non-finite steps: skipped on all ranks and counted, then a rollback past the bad data, then a bounded stop.

The test hook lives in the tests, not in production code: helpers.poisoned makes a dataset whose windows
for chosen steps hold byte 0xFF and a model (for `--init-from`) whose embedding row for that byte is NaN.
"""
import json

import numpy as np
import pytest
import torch
from helpers import TINY_ARGS, poisoned, run_cli, same, training_records, warmup_cosine

from trainer import checkpoint
from trainer.errors import UserError
from trainer.train import recovery
from trainer.train.state import TrainState

GLOBAL_BATCH, SEQ = 8, 64  # as in ARGS (TINY_ARGS: --seq-len 64) and helpers.poisoned's defaults
ARGS = [*TINY_ARGS, "--global-batch", str(GLOBAL_BATCH), "--max-steps", "10", "--set", "tie_embeddings=false",
        "--no-tracking", "--ds-config", "zero2_fp32"]


def pretrain(data, out, *extra, check=True):
    return run_cli(["pretrain", *ARGS, "--data", str(data), "--out", str(out), *extra], ranks=2, check=check)


def test_nonfinite_steps_are_skipped_counted_then_rolled_back_past_the_bad_data(data, tmp_path):
    dataset, model = poisoned(data, tmp_path, steps=[5, 6])
    run_dir = tmp_path / "run"
    proc = pretrain(dataset, run_dir, "--init-from", str(model), "--max-skips", "2", "--save-every", "1",
                    "--keep-last", "0", "--json")
    result = json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))
    records = training_records(run_dir)
    steps = [r["step"] for r in records]
    assert steps == [1, 2, 3, 4, 5, 6, 6, 7, 8, 9, 10]  # step 6 ran again after the rollback
    bad = records[4:6]
    assert all(np.isnan(r["loss"]) for r in bad) and [r["skipped"] for r in bad] == [1, 2]  # counted
    # A skipped update uses up its step of the schedule: every step's rate is the uninterrupted schedule's,
    # step 6 has the same rate when it runs again after the rollback, and the run ends on the final rate.
    expected = [warmup_cosine(s - 1, 3e-3, 3e-4, total=10) for s in steps]  # ARGS' schedule
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12)
    assert all(np.isfinite(r["loss"]) for r in records[:4] + records[6:])
    assert "step 5: non-finite gradients, update skipped on all ranks" in proc.stdout
    assert "rolled back to step_0000005 (rollback 1 of at most 3) after 2 non-finite steps" in proc.stdout
    assert result["step"] == 10 and result["skipped"] == 2 and np.isfinite(result["loss"])
    # The skipped step left the weights alone: step 5's checkpoint holds step 4's weights, bit for bit.
    w4, c4 = checkpoint.consolidated_state_dict(run_dir / "checkpoints" / "step_0000004")
    w5, c5 = checkpoint.consolidated_state_dict(run_dir / "checkpoints" / "step_0000005")
    assert all(same(w4[k], w5[k]) for k in w4)
    # The rollback skipped the offending window (samples 40-47, step 6's batch): 8 samples more were read.
    final = checkpoint.read_marker(run_dir / "checkpoints" / "step_0000010")
    assert final["cursor"] == 10 * GLOBAL_BATCH + GLOBAL_BATCH and final["tokens"] == 10 * GLOBAL_BATCH * SEQ


@pytest.mark.slow
def test_rollbacks_are_bounded(data, tmp_path):
    dataset, model = poisoned(data, tmp_path, steps=range(5, 14))
    run_dir = tmp_path / "run"
    proc = pretrain(dataset, run_dir, "--init-from", str(model), "--max-skips", "2", "--max-rollbacks", "2",
                    "--save-every", "2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert errors and "after 2 rollback(s) (limit --max-rollbacks 2)" in errors[0]
    assert proc.stdout.count("rolled back to step_0000004") == 2
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert checkpoint.damage(run_dir / "checkpoints" / "step_0000004") is None


# ---- roll_back's decisions, without DeepSpeed -----------------------------------------------------------

def _fake_checkpoint(run_dir, step, cursor):
    ckpt = run_dir / "checkpoints" / checkpoint.tag_for(step)
    ckpt.mkdir(parents=True)
    torch.save({"step": step}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / checkpoint.MARKER).write_text(json.dumps({"step": step, "cursor": cursor, "world_size": 1,
                                                      "files": ["mp_rank_00_model_states.pt"]}))
    return ckpt


def test_roll_back_picks_the_newest_sound_checkpoint_not_after_the_current_step(tmp_path, monkeypatch):
    _fake_checkpoint(tmp_path, 2, 16)
    sound = _fake_checkpoint(tmp_path, 4, 32)
    damaged = _fake_checkpoint(tmp_path, 6, 48)
    (damaged / "mp_rank_00_model_states.pt").write_bytes(b"")
    _fake_checkpoint(tmp_path, 9, 72)  # from a later trajectory: never "back"
    loaded = []
    monkeypatch.setattr(checkpoint, "load", lambda engine, ckpt, path=None: loaded.append(ckpt) or
                        {"step": int(ckpt.name[5:]), "tokens": 99, "cursor": 32})
    monkeypatch.setattr(checkpoint, "saved_layout", lambda ckpt: {})
    monkeypatch.setattr(checkpoint, "engine_layout", lambda engine: {})
    state = TrainState(step=8, cursor=64, tokens=4096, skips_in_a_row=2)
    assert recovery.roll_back(checkpoint.Checkpointer(tmp_path), object(), state, 2, 1) == sound and loaded == [sound]
    assert (state.step, state.cursor, state.tokens, state.rollbacks) == (4, 64, 99, 1)
    with pytest.raises(UserError, match=r"after 1 rollback\(s\) \(limit --max-rollbacks 1\)"):
        recovery.roll_back(checkpoint.Checkpointer(tmp_path), object(), state, 2, 1)


def test_roll_back_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(UserError, match="no complete checkpoint to roll back to yet .*--save-every"):
        recovery.roll_back(checkpoint.Checkpointer(tmp_path), object(), TrainState(step=3, cursor=24, skips_in_a_row=2),
                           2, 1)
