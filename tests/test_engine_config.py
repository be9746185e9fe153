"""The trainer owns batch sizes, clipping and optimizer numbers; a JSON that disagrees is refused."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.engine import ds_config
from trainer.errors import UserError

NUMBERS = dict(micro_batch=4, grad_accum=2, world_size=2, grad_clip=1.0, lr=3e-4, betas=(0.9, 0.95), eps=1e-8,
               weight_decay=0.1)


@pytest.mark.parametrize("name", ["zero0_bf16", "zero1_bf16", "zero2_bf16", "zero2_offload_bf16", "zero3_bf16",
                                  "zero2_fp16", "zero2_fp32"])
def test_every_shipped_config_merges(name):
    config = ds_config.build_ds_config(ds_config.load_ds_config(name), **NUMBERS)
    assert config["train_batch_size"] == 16
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["type"] == "AdamW"


def test_stage_and_precision_are_read_from_the_json():
    assert ds_config.zero_stage(ds_config.load_ds_config("zero3_bf16")) == 3
    assert ds_config.precision(ds_config.load_ds_config("zero2_fp16")) == "fp16"
    assert ds_config.precision(ds_config.load_ds_config("zero2_fp32")) == "fp32"
    assert ds_config.offloads_optimizer(ds_config.load_ds_config("zero2_offload_bf16"))


def test_conflicting_batch_size_names_the_key():
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu=8"):
        ds_config.build_ds_config({"train_micro_batch_size_per_gpu": 8}, **NUMBERS)


def test_conflicting_lr_names_the_key():
    with pytest.raises(UserError, match=r"optimizer\.params\.lr"):
        ds_config.build_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 1.0}}}, **NUMBERS)


def test_auto_and_equal_values_are_accepted():
    config = ds_config.build_ds_config({"train_batch_size": "auto", "gradient_clipping": 1.0}, **NUMBERS)
    assert config["train_batch_size"] == 16


def test_scheduler_block_is_refused():
    with pytest.raises(UserError, match="scheduler"):
        ds_config.build_ds_config({"scheduler": {"type": "WarmupLR"}}, **NUMBERS)


def test_missing_and_malformed_json(tmp_path):
    with pytest.raises(UserError, match="zero2_bf16"):
        ds_config.load_ds_config("no_such_config")
    bad = tmp_path / "bad.json"
    bad.write_text("{\"zero_optimization\": ")
    with pytest.raises(UserError, match="not valid JSON"):
        ds_config.load_ds_config(str(bad))


def test_auto_config_is_a_shipped_file():
    path = ds_config.resolve_ds_config_path("auto")
    assert path.is_file() and json.loads(path.read_text())["zero_optimization"]["stage"] == 2


_SECTION = st.fixed_dictionaries({}, optional={"enabled": st.booleans()})


@settings(max_examples=200, deadline=None)
@given(bf16=_SECTION, bfloat16=_SECTION, fp16=_SECTION, present=st.sets(st.sampled_from(["bf16", "bfloat16", "fp16"])))
def test_precision_is_read_the_way_deepspeed_reads_it(bf16, bfloat16, fp16, present):
    """DeepSpeed's own config parser is the oracle (it also accepts the older `bfloat16` spelling)."""
    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config

    sections = {"bf16": bf16, "bfloat16": bfloat16, "fp16": fp16}
    config = {k: v for k, v in sections.items() if k in present}
    ds_bf16 = get_bfloat16_config(config).enabled
    ds_fp16 = get_float16_config(config).enabled
    expected = "bf16" if ds_bf16 else "fp16" if ds_fp16 else "fp32"
    assert ds_config.precision(config) == expected


def test_the_older_bfloat16_spelling_is_bf16():
    assert ds_config.precision({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}}) == "bf16"


@pytest.mark.parametrize("name, dtype", [("zero2_bf16", "fp32"), ("zero2_offload_bf16", "fp32"), ("zero3_bf16", "fp32"),
                                         ("zero1_bf16", None), ("zero0_bf16", None), ("zero2_muon_bf16", "fp32"),
                                         ("zero3_muon_bf16", "fp32"), ("zero1_muon_bf16", None),
                                         ("zero0_muon_bf16", None)])
def test_bf16_gradients_accumulate_in_fp32_where_deepspeed_allows(name, dtype):
    """Read the way DeepSpeed reads it (None: the model's dtype, bf16)."""
    from deepspeed.runtime.config import get_data_types_params

    assert get_data_types_params(ds_config.load_ds_config(name)).get("grad_accum_dtype") == dtype


# ---- which optimizer code runs ----------------------------------------------------------------------

SHIPPED = sorted(p.stem for p in ds_config.DS_CONFIG_DIR.glob("*.json"))


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_run_torch_adamw_and_build_nothing(name):
    """Every shipped config but the two that name DeepSpeed's ops runs torch's AdamW: fused where its state is on
    a GPU, foreach on a CPU (ZeRO-Offload keeps DeepSpeed's CPU Adam, zero2_fusedadam_bf16 its FusedAdam)."""
    config = ds_config.load_ds_config(name)
    gpu, cpu = (ds_config.optimizer_implementation(config, device) for device in ("cuda", "cpu"))
    if name == "zero2_offload_bf16":
        assert gpu.op == cpu.op == "cpu_adam" and gpu.label == "DeepSpeed CPUAdam"
    elif name == "zero2_fusedadam_bf16":
        assert gpu.op == cpu.op == "fused_adam" and gpu.label == "DeepSpeed FusedAdam"
    else:
        assert gpu.op is cpu.op is None
        assert (gpu.fused, gpu.foreach, cpu.fused, cpu.foreach) == (True, False, False, True)
        assert gpu.label.endswith("torch.optim.AdamW (fused)") and cpu.label.endswith("torch.optim.AdamW (foreach)")
        assert gpu.label.startswith("Muon + ") == ("muon" in name)


def test_a_json_can_pick_torch_adamw_flags_and_deepspeed_fused_adam():
    base = {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": False, "foreach": False}}}
    assert ds_config.optimizer_implementation(base, "cuda").label == "torch.optim.AdamW (for-loop)"
    offloaded = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
                 "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}
    assert ds_config.optimizer_implementation(offloaded, "cuda").adam_flags == {"fused": False, "foreach": True}
    # DeepSpeed's own default when a JSON does not say: its FusedAdam (a build on first use)
    assert ds_config.optimizer_implementation({"optimizer": {"type": "Adam"}}, "cuda").op == "fused_adam"
    with pytest.raises(UserError, match="fused.*foreach"):
        ds_config.optimizer_implementation(
            {"optimizer": {"type": "AdamW", "params": {"torch_adam": True, "fused": True, "foreach": True}}}, "cpu")


@pytest.mark.parametrize("name", SHIPPED)
def test_grad_clip_default_follows_the_optimizer_and_stage(name):
    """1.0, except Muon under ZeRO-1/2/3, where DeepSpeed's clip would clip Muon's update: off, with the reason."""
    config = ds_config.load_ds_config(name)
    clip, why = ds_config.default_grad_clip(config)
    if "muon" in name and not name.startswith("zero0"):
        assert clip == 0.0 and "Muon" in why and "\n" not in why
        ds_config.build_ds_config(config, **{**NUMBERS, "grad_clip": clip})  # the default is accepted
    else:
        assert (clip, why) == (1.0, None)
