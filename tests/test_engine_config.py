"""The trainer owns batch sizes, clipping and optimizer numbers; a JSON that disagrees is refused."""
import json

import pytest

from trainer import engine
from trainer.errors import UserError

NUMBERS = dict(micro_batch=4, grad_accum=2, world_size=2, grad_clip=1.0, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
               weight_decay=0.1)


@pytest.mark.parametrize("name", ["zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2_offload_bf16", "zero3_bf16",
                                  "zero2_fp16", "zero2_fp32"])
def test_every_shipped_config_merges(name):
    config = engine.build_ds_config(engine.load_ds_config(name), **NUMBERS)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["type"] == "AdamW"


def test_stage_and_precision_are_read_from_the_json():
    assert engine.zero_stage(engine.load_ds_config("zero3_bf16")) == 3
    assert engine.precision(engine.load_ds_config("zero2_fp16")) == "fp16"
    assert engine.precision(engine.load_ds_config("zero2_fp32")) == "fp32"
    assert engine.offloads_optimizer(engine.load_ds_config("zero2_offload_bf16"))


def test_conflicting_batch_size_names_the_key():
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8"):
        engine.build_ds_config({"train_micro_batch_size_per_gpu": 8}, **NUMBERS)


def test_conflicting_lr_names_the_key():
    with pytest.raises(UserError, match=r"optimizer\.params\.lr"):
        engine.build_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, **NUMBERS)


def test_auto_and_equal_values_are_accepted():
    config = engine.build_ds_config({"train_batch_size": "auto", "gradient_clipping": 1.0}, **NUMBERS)
    assert config["train_batch_size"] == 16


def test_scheduler_block_is_refused():
    with pytest.raises(UserError, match="scheduler"):
        engine.build_ds_config({"scheduler": {"type": "WarmupLR"}}, **NUMBERS)


def test_missing_and_malformed_json(tmp_path):
    with pytest.raises(UserError, match="zero2_bf16"):
        engine.load_ds_config("no_such_config")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"zero_optimization\": ")
    with pytest.raises(UserError, match="not valid JSON"):
        engine.load_ds_config(str(bad))


def test_auto_config_is_a_shipped_file():
    path = engine.resolve_ds_config_path("auto")
    assert path.is_file() and json.loads(path.read_text())["zero_optimization"]["stage"] == 2
