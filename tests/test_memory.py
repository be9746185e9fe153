"""Memory estimator: formulas against hand-computed cases, against a live DeepSpeed engine (ZeRO 0/1/2,
1 and 2 ranks) and against the profiler's activation peak; the CLI contract."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from models import get_config
from trainer import dist, memory
from trainer.cli import cli
from trainer.engine import ds_config

ROOT = Path(__file__).resolve().parent.parent
GB = 2 ** 30
GPT25 = {"mlp": "swiglu", "norm": "rmsnorm", "pos_emb": "rope", "bias": False}


# ---- formulas, by hand ---------------------------------------------------------------------------
def test_model_states_bf16_by_hand():
    P = 1_000_000
    bf16 = memory.DSSetup(stage=0, precision="bf16")
    assert memory.model_state_bytes(P, bf16, 2) == {"params": 2 * P, "grads": 2 * P, "master": 4 * P,
                                                    "adam": 8 * P, "step_temp": 10 * P, "cpu": 0.0}
    for stage in (1, 2):
        s = memory.model_state_bytes(P, memory.DSSetup(stage=stage, precision="bf16"), 4)
        assert (s["params"], s["grads"], s["master"], s["adam"], s["step_temp"]) == (2 * P, P / 2, P, 2 * P, 2 * P)
    # ZeRO paper's 16 bytes/param at stage 0 (2 + 2 + 12), before the step's temporaries.
    s = memory.model_state_bytes(P, bf16, 1)
    assert s["params"] + s["grads"] + s["master"] + s["adam"] == 16 * P


def test_model_states_fp32_and_offload_by_hand():
    P = 1_000_000
    s = memory.model_state_bytes(P, memory.DSSetup(stage=0, precision="fp32"), 1)
    assert (s["params"], s["grads"], s["master"], s["adam"]) == (4 * P, 4 * P, 0, 8 * P)
    s = memory.model_state_bytes(P, memory.DSSetup(stage=2, precision="fp32"), 2)
    assert (s["params"], s["grads"], s["master"], s["adam"]) == (4 * P, 2 * P, 2 * P, 4 * P)
    s = memory.model_state_bytes(P, memory.DSSetup(stage=2, precision="bf16", offload_optimizer=True), 2, 1000)
    assert (s["master"], s["adam"], s["cpu"]) == (0, 0, (16 + 2) * P / 2)


def test_buckets_from_json():
    z2 = memory.DSSetup.from_json(ds_config.load_ds_config("zero2_bf16"))
    assert (z2.stage, z2.precision, z2.overlap_comm, z2.reduce_bucket_size) == (2, "bf16", True, 200_000_000)
    assert memory.bucket_bytes(z2, 10**9) == 2 * 200_000_000 * 2          # two bf16 buffers with overlap_comm
    z1 = memory.DSSetup.from_json(ds_config.load_ds_config("zero1_bf16"))
    assert memory.bucket_bytes(z1, 10**9) == 200_000_000 * 2               # overlap_comm off: one buffer
    assert memory.bucket_bytes(memory.DSSetup.from_json(ds_config.load_ds_config("zero0_bf16")), 10**9) == 0
    assert memory.DSSetup.from_json(ds_config.load_ds_config("zero2_offload_bf16")).offload_optimizer


def test_activations_gpt2_by_hand():
    # bf16 GPT-2 layer: 36 sbh + 4 abs (Korthikanti's 34 sbh + 5 a s^2 b, adapted: see trainer/memory.py).
    cfg = get_config("gpt2", padded_vocab_size=50304)
    b, s, h, a, Vp = 2, 1024, 768, 12, 50304
    act = memory.activation_bytes(cfg, b, s, 2, checkpointing=False)
    assert act["per_layer"] == 36 * s * b * h + 4 * a * b * s
    assert act["logits"] == 2 * b * s * Vp + 4 * b * s      # bf16 dloss/dlogits and fp32 per-token losses only
    assert act["stored"] == 12 * act["per_layer"] + 6 * s * b * h + act["logits"]
    chunk = (1 << 23) // Vp                                   # tokens per loss chunk: 2**23 logits
    loss_fwd = chunk * Vp * (2 + 4)                           # one chunk of logits, bf16 and its fp32 copy
    loss_bwd = 2 * Vp * h + 2 * 2 * b * s * h                 # the head's weight gradient, its input's, scaled input
    # blocks' backward: dlogits freed, the tied head's weight gradient held, one layer's working set
    blocks = act["stored"] - act["logits"] + 2 * b * s * h + 2 * Vp * h + 2 * s * b * (4 * h + h) + 2 * 4 * h * h
    assert act["peak"] == max(act["stored"] + max(loss_fwd, loss_bwd), blocks) == act["stored"] + loss_bwd
    ck = memory.activation_bytes(cfg, b, s, 2, checkpointing=True)
    assert ck["blocks"] == 12 * 2 * s * b * h                 # only each block's input is kept
    assert ck["peak"] == ck["blocks"] + 6 * s * b * h + act["logits"] + max(loss_fwd, loss_bwd)  # the loss peaks


def test_activations_swiglu_by_hand():
    cfg = get_config("gpt25-medium")                                       # h 1024, f 2816, RMSNorm
    b, s, h, f, a = 1, 512, 1024, 2816, 16
    act = memory.activation_bytes(cfg, b, s, 2, checkpointing=False)
    assert act["per_layer"] == (2 * 8 + 6 * 2) * s * b * h + 4 * 2 * s * b * f + 4 * a * b * s


def test_parameter_counts_are_the_published_ones():
    assert memory.param_stats(get_config("gpt2"))["n_params"] == 124_439_808
    assert memory.param_stats(get_config("gpt2-medium"))["n_params"] == 354_823_168
    # The estimator pads the vocabulary like pretrain does (50257 -> 50304 rows).
    assert memory.param_stats(memory.model_config("gpt2"))["n_params"] == 124_439_808 + 47 * 768


def test_gpt2_medium_fits_micro_batch_8_on_two_24gb_cards():
    est = memory.estimate("gpt2-medium", ds_config.load_ds_config("zero2_bf16"), gpus=2, micro_batch=8, seq_len=1024,
                          gpu_memory_gb=24)
    assert est.fits and est.max_micro_batch >= 8 and est.total_gb < 24
    more = memory.estimate("gpt2-medium", ds_config.load_ds_config("zero2_bf16"), gpus=2,
                           micro_batch=est.max_micro_batch + 1,
                           seq_len=1024, gpu_memory_gb=24)
    assert not more.fits
    ckpt = memory.estimate("gpt2-medium", ds_config.load_ds_config("zero2_bf16"), gpus=2, micro_batch=8, seq_len=1024,
                           activation_checkpointing=True, gpu_memory_gb=24)
    assert ckpt.max_micro_batch > est.max_micro_batch and ckpt.total_gb < est.total_gb


def test_zero_stages_order_and_recommendation_table():
    cfgs = {n: ds_config.load_ds_config(n) for n in ("zero0_bf16", "zero1_bf16", "zero2_bf16")}
    totals = {n: memory.estimate("gpt2-large", c, gpus=2, micro_batch=1, seq_len=1024).optimizer_gb
              for n, c in cfgs.items()}
    assert totals["zero0_bf16"] == pytest.approx(2 * totals["zero2_bf16"], rel=1e-3)
    rows = {(r["model"], r["gpus"], r["gpu_memory_gb"]): r for r in memory.table()}
    assert rows[("gpt2-medium", 2, 24.0)]["micro_batch"] >= 8
    assert all(r["fits"] and r["total_gb"] <= r["gpu_memory_gb"] for r in rows.values())
    assert "| gpt2-medium (355M) | 2 x 24 GB |" in memory.table_markdown(list(rows.values()))


# ---- validation: the profiler's activation peak --------------------------------------------------
@pytest.mark.parametrize("overrides", [{}, GPT25], ids=["gpt2", "gpt25"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["full", "ckpt"])
def test_activation_estimate_matches_profiler_peak(overrides, checkpointing):
    cfg = get_config("tiny", vocab_size=1000, padded_vocab_size=1024, n_embd=128, n_head=2, **overrides)
    measured = memory.measure_activations(cfg, 2, 64, torch.bfloat16, checkpointing)
    est = memory.activation_bytes(cfg, 2, 64, 2, checkpointing)
    assert est["peak"] == pytest.approx(measured["peak"], rel=0.15)
    assert est["stored"] == pytest.approx(measured["stored"], rel=0.15)


def test_activation_estimate_with_the_gpt2_vocabulary():
    # 50257 -> 50304: the loss's chunks and dlogits dominate; a chunk boundary falls inside the batch.
    cfg = get_config("gpt2-mini", n_layer=2, block_size=128, padded_vocab_size=50304)
    for dtype, e in ((torch.bfloat16, 2), (torch.float32, 4)):
        measured = memory.measure_activations(cfg, 2, 128, dtype, False)
        est = memory.activation_bytes(cfg, 2, 128, e, False)
        assert est["peak"] == pytest.approx(measured["peak"], rel=0.05)
        assert est["stored"] == pytest.approx(measured["stored"], rel=0.05)


def test_activation_estimate_when_layers_dominate():
    cfg = get_config("tiny", vocab_size=64, n_layer=4)                    # tiny vocabulary: the blocks dominate
    for ckpt in (False, True):
        measured = memory.measure_activations(cfg, 4, 64, torch.bfloat16, ckpt)
        assert memory.activation_bytes(cfg, 4, 64, 2, ckpt)["peak"] == pytest.approx(measured["peak"], rel=0.15)


# ---- validation: bytes a live DeepSpeed engine holds ---------------------------------------------
def _engine_reports(nproc: int) -> list[dict]:
    env = dict(os.environ, MASTER_PORT=str(dist.free_port()), MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    script = [str(ROOT / "bench" / "memory.py"), "engine", "--stages", "0,1,2"]
    cmd = [sys.executable, *script] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *script]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line[len("MEMORY "):]) for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
    assert len(reports) == 3 * nproc, proc.stdout[-2000:]
    return reports


def _check_engine(reports):
    for r in reports:
        for phase in ("after_backward", "after_step"):
            measured, estimated = r[f"measured_{phase}"], r[f"estimated_{phase}"]
            assert estimated == pytest.approx(measured, rel=0.05), (r["stage"], r["world"], phase, measured, estimated)


def test_engine_bytes_match_estimate_one_rank():
    _check_engine(_engine_reports(1))


@pytest.mark.slow
def test_engine_bytes_match_estimate_two_ranks():
    reports = _engine_reports(2)
    _check_engine(reports)
    by_stage = {r["stage"]: r["measured_after_step"] for r in reports if r["rank"] == 0}
    assert by_stage[1] < 0.6 * by_stage[0]                                  # ZeRO-1 halves the optimizer state


# ---- CLI ----------------------------------------------------------------------------------------
def test_cli_json_contract():
    result = CliRunner().invoke(cli, ["estimate-memory", "--model", "gpt2-medium", "--ds-config", "zero2_bf16",
                                      "--gpus", "2", "--micro-batch", "8", "--seq-len", "1024",
                                      "--no-activation-checkpointing", "--gpu-memory", "24", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    for key in ("params_gb", "grads_gb", "optimizer_gb", "activations_gb", "total_gb", "fits", "max_micro_batch"):
        assert key in out
    assert out["fits"] and out["max_micro_batch"] >= 8
    assert out["params_gb"] == pytest.approx(2 * out["n_params"] / GB, abs=1e-3)


def test_cli_set_offload_and_text_output():
    result = CliRunner().invoke(cli, ["estimate-memory", "--model", "gpt2", "--set", "n_layer=6",
                                      "--ds-config", "zero2_offload_bf16", "--micro-batch", "2", "--seq-len", "256"])
    assert result.exit_code == 0, result.output
    assert "host memory for the offloaded optimizer" in result.output and "largest micro-batch" in result.output


@pytest.mark.parametrize("args, message", [
    (["--model", "gpt9"], "unknown model preset"),
    (["--set", "n_layers=3"], "unknown model config field"),
    (["--ds-config", "zero9"], "not found"),
    (["--seq-len", "4096"], "block_size"),
    (["--micro-batch", "0"], "--micro-batch"),
    (["--gpu-memory", "0"], "--gpu-memory"),
])
def test_cli_bad_input_is_one_line_error(args, message):
    result = CliRunner().invoke(cli, ["estimate-memory", *args])
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output
