"""Checkpoint bookkeeping without DeepSpeed processes: completeness, `latest`, keep-last, resume choice,
layout mismatch detection and the errors a user sees for partial checkpoints.

A fake engine stands in for DeepSpeed's save_checkpoint, so these run in milliseconds; the real
engines are exercised in test_resume.py and test_zero_to_fp32.py.
"""
import json

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint.store import write_marker
from trainer.errors import UserError


class FakeEngine:
    """Writes what DeepSpeed's save_checkpoint writes for ZeRO-2 on one rank (file names only matter here)."""

    def __init__(self, stage=2, bf16=True, fail_at=None):
        self.stage, self.bf16, self.fail_at = stage, bf16, fail_at

    def save_checkpoint(self, root, tag, client_state, save_latest):
        if self.fail_at == tag:
            raise RuntimeError("disk full")  # a crash in the middle of a save
        d = checkpoint.Path(root) / tag
        d.mkdir(parents=True, exist_ok=True)
        torch.save({"dp_world_size": 1, **client_state}, d / "mp_rank_00_model_states.pt")
        torch.save({}, d / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")

    def zero_optimization_stage(self):
        return self.stage

    def bfloat16_enabled(self):
        return self.bf16

    def fp16_enabled(self):
        return False

    def zero_use_cpu_optimizer(self):
        return False

    def optimizer_name(self):
        return "adamw"


def client(step):
    return {"step": step, "cursor": step * 8, "tokens": step * 512, "global_batch": 8, "seq_len": 64}


def test_save_writes_marker_last_and_latest(tmp_path):
    ckpt = checkpoint.save(FakeEngine(), tmp_path, 5, client(5))
    marker = checkpoint.read_marker(ckpt)
    assert ckpt.name == "step_0000005" and checkpoint.is_complete(ckpt)
    assert (marker["world_size"], marker["zero_stage"], marker["precision"], marker["offload"]) == (1, 2, "bf16", False)
    assert (marker["global_batch"], marker["cursor"]) == (8, 40)
    assert "rng/rank_0.pt" in marker["files"] and "mp_rank_00_model_states.pt" in marker["files"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000005"


def test_crashed_save_is_never_resumed_and_latest_stays(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, 2, client(2))
    with pytest.raises(RuntimeError):
        checkpoint.save(FakeEngine(fail_at="step_0000004"), tmp_path, 4, client(4))
    (tmp_path / "checkpoints" / "step_0000004").mkdir(exist_ok=True)  # what a crash leaves behind
    assert checkpoint.find_resume(tmp_path, "auto").name == "step_0000002"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000002"
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "checkpoints" / "step_0000004"))


def test_keep_last_deletes_older_complete_checkpoints_only_after_a_newer_one(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(FakeEngine(), tmp_path, step, client(step), keep_last=2)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]
    with pytest.raises(RuntimeError):  # the newer save fails: nothing older may go
        checkpoint.save(FakeEngine(fail_at="step_0000004"), tmp_path, 4, client(4), keep_last=1)
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000003"]


def test_resume_choices(tmp_path):
    assert checkpoint.find_resume(tmp_path, "auto") is None
    assert checkpoint.find_resume(tmp_path, "never") is None
    with pytest.raises(UserError, match="no such checkpoint"):
        checkpoint.find_resume(tmp_path, str(tmp_path / "nope"))
    ckpt = checkpoint.save(FakeEngine(), tmp_path, 3, client(3))
    assert checkpoint.find_resume(tmp_path, "auto") == ckpt
    assert checkpoint.find_resume(tmp_path / "other", str(tmp_path)) == ckpt  # a run dir as PATH
    assert checkpoint.find_resume(tmp_path / "other", str(ckpt)) == ckpt
    (ckpt / "universal").mkdir()
    (ckpt / "universal" / "COMPLETE").write_text("{}")
    assert checkpoint.find_resume(tmp_path, "auto") == ckpt  # the cached universal copy is not a checkpoint
    assert checkpoint.find_resume(tmp_path, str(ckpt / "universal")) == ckpt


def test_layout_mismatch_is_detected_before_the_engine_exists(tmp_path):
    ckpt = checkpoint.save(FakeEngine(), tmp_path, 3, client(3))
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    assert not checkpoint.needs_conversion(ckpt, 1, zero2)
    assert checkpoint.prepare_resume(ckpt, 1, zero2, global_batch=8) == (ckpt, zero2)
    assert checkpoint.needs_conversion(ckpt, 2, zero2)
    assert checkpoint.needs_conversion(ckpt, 1, {**zero2, "zero_optimization": {"stage": 1}})
    assert checkpoint.needs_conversion(ckpt, 1, {"zero_optimization": {"stage": 2}})  # bf16 -> fp32
    offload = {**zero2, "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    assert checkpoint.needs_conversion(ckpt, 1, offload)


def test_the_optimizer_must_match_but_only_muon_against_the_rest(tmp_path):
    """A marker from before the optimizer was recorded, or of another Adam-type JSON, loads as before; a Muon
    checkpoint does not load into an AdamW run (their states differ) and the other way round."""
    ckpt = checkpoint.save(FakeEngine(), tmp_path, 3, client(3))
    marker = checkpoint.read_marker(ckpt)
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    for recorded in (None, "adam", "AdamW"):
        write_marker(ckpt, {k: v for k, v in marker.items() if k != "optimizer"}
                     | ({"optimizer": recorded} if recorded else {}))
        assert checkpoint.prepare_resume(ckpt, 1, zero2, global_batch=8) == (ckpt, zero2)
        with pytest.raises(UserError, match="trained with the adamw optimizer.*uses muon.*--init-from"):
            checkpoint.prepare_resume(ckpt, 1, {**zero2, "optimizer": {"type": "Muon"}}, global_batch=8)
    write_marker(ckpt, {**marker, "optimizer": "muon"})
    with pytest.raises(UserError, match="trained with the muon optimizer"):
        checkpoint.prepare_resume(ckpt, 1, zero2, global_batch=8)


def test_a_model_option_added_after_a_checkpoint_counts_as_off_in_it():
    """A checkpoint's model_config written before qk_norm / relu_squared / logit_softcap existed describes a
    model without them: resuming it with one turned on is another architecture, named."""
    import dataclasses

    import models

    mine = dataclasses.asdict(models.get_config("tiny", vocab_size=257))
    old = {k: v for k, v in mine.items() if k not in ("qk_norm", "relu_squared", "logit_softcap", "zero_init_proj")}
    assert checkpoint.architecture_differences(old, mine) == []
    assert checkpoint.architecture_differences(old, {**mine, "relu_squared": True}) == [("relu_squared", False, True)]
    assert checkpoint.architecture_differences(old, {**mine, "logit_softcap": 15.0}) == [("logit_softcap", 0.0, 15.0)]
    assert checkpoint.architecture_differences(old, {**mine, "zero_init_proj": True}) == []  # initialisation only


def test_global_batch_change_and_zero0_crossing_are_clear_errors(tmp_path):
    ckpt = checkpoint.save(FakeEngine(), tmp_path, 3, client(3))
    zero2 = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    with pytest.raises(UserError, match="global batch of 8 sequences.*--global-batch 8"):
        checkpoint.prepare_resume(ckpt, 2, zero2, global_batch=16)
    with pytest.raises(UserError, match="universal checkpoint does not cover ZeRO-0"):
        checkpoint.prepare_resume(ckpt, 1, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}})
    zero0 = checkpoint.save(FakeEngine(stage=0), tmp_path / "z0", 3, client(3))
    # ZeRO-0 is not partitioned: another rank count loads as is.
    cfg0 = {"bf16": {"enabled": True}}
    assert checkpoint.prepare_resume(zero0, 2, cfg0, global_batch=8) == (zero0, cfg0)


def test_partial_checkpoint_errors_name_the_missing_shards(tmp_path):
    ckpt = tmp_path / "step_0000007"
    ckpt.mkdir()
    with pytest.raises(UserError, match="not a DeepSpeed checkpoint"):
        checkpoint.check_shards(ckpt)
    torch.save({"dp_world_size": 2}, ckpt / "mp_rank_00_model_states.pt")
    torch.save({}, ckpt / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(UserError, match="saved by 2 ranks, so it needs 2 optimizer shard files.*only 1"):
        checkpoint.check_shards(ckpt)
    torch.save({}, ckpt / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    (ckpt / "rng").mkdir()
    with pytest.raises(UserError, match="no COMPLETE marker"):
        checkpoint.check_shards(ckpt)
    (ckpt / "COMPLETE").write_text(json.dumps({"files": ["mp_rank_00_model_states.pt", "rng/rank_1.pt"]}))
    with pytest.raises(UserError, match="1 of its 2 files are gone"):
        checkpoint.check_shards(ckpt)


def test_resolve_checkpoint_from_run_dir_tag_or_step_number(tmp_path):
    for step in (2, 4):
        checkpoint.save(FakeEngine(), tmp_path, step, client(step))
    (tmp_path / "checkpoints" / "step_0000006").mkdir()  # incomplete, newest
    assert checkpoint.resolve_checkpoint(tmp_path).name == "step_0000004"
    assert checkpoint.resolve_checkpoint(tmp_path, "2").name == "step_0000002"
    assert checkpoint.resolve_checkpoint(tmp_path, "step_0000002").name == "step_0000002"
    with pytest.raises(UserError, match="checkpoints there: step_0000002, step_0000004, step_0000006"):
        checkpoint.resolve_checkpoint(tmp_path, "9")


def test_a_rewind_sets_newer_checkpoints_aside_and_keep_last_never_deletes_the_new_one(tmp_path, capsys):
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, step, client(step), keep_last=2)  # leaves step_4 and step_6
    (tmp_path / "checkpoints" / "step_0000008").mkdir()  # an interrupted save of the old timeline
    ck = checkpoint.Checkpointer(tmp_path, save_every=1, keep_last=1)
    assert ck.choose(str(tmp_path / "checkpoints" / "step_0000004")).name == "step_0000004"
    ck.start_timeline(4)
    out = capsys.readouterr().out
    assert "step_0000006 belong to an abandoned timeline" in out and "never resumed from" in out
    assert checkpoint.read_latest(tmp_path) == "step_0000004"
    ck.save(FakeEngine(), 5, client(5))
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000005"]
    assert checkpoint.read_latest(tmp_path) == "step_0000005"
    assert checkpoint.find_resume(tmp_path, "auto").name == "step_0000005"
    [aside] = (tmp_path / "checkpoints" / checkpoint.ABANDONED).glob("*-after-step_0000004")
    assert [p.name for p in aside.iterdir()] == ["step_0000006"] and checkpoint.is_complete(aside / "step_0000006")
    assert not (tmp_path / "checkpoints" / "step_0000008").exists()


def test_prune_keeps_the_newest_and_the_current(tmp_path):
    for step in (1, 2, 3, 4):
        checkpoint.save(FakeEngine(), tmp_path, step, client(step))
    assert checkpoint.store.prune(tmp_path, 2, current_step=3) == ["step_0000001", "step_0000002"]
    assert [p.name for p in checkpoint.complete_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_an_interrupted_rewind_is_finished_before_anything_is_resumed(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(FakeEngine(), tmp_path, step, client(step))
    root = tmp_path / "checkpoints"
    journal = {"step": 2, "reason": "test", "into": "abandoned/x", "move": ["step_0000004", "step_0000006"],
               "delete": []}
    (root / checkpoint.store.REWIND_JOURNAL).write_text(json.dumps(journal))
    (root / "abandoned" / "x").mkdir(parents=True)
    (root / "step_0000004").rename(root / "abandoned" / "x" / "step_0000004")  # killed after the first move
    assert checkpoint.Checkpointer(tmp_path).choose("auto").name == "step_0000002"  # never the old step_6
    assert sorted(p.name for p in (root / "abandoned" / "x").iterdir()) == ["step_0000004", "step_0000006"]
    assert not (root / checkpoint.store.REWIND_JOURNAL).exists()
