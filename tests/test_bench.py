"""bench/train_throughput.py: both models really train through the same engine, and the figures add up."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "train_throughput.py"
SHAPE = ["--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--repeats", "1",
         "--ds-config", "zero2_fp32", "--json"]


def clean_env(tmp_path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}  # synthetic data under tmp_path
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def run_bench(cmd, tmp_path) -> dict:
    proc = subprocess.run(cmd, cwd=tmp_path, env=clean_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "ours / hf:" in proc.stdout  # the table a user reads
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{")))


def check(out: dict, ranks: int, hf_model: str):
    assert out["ranks"] == ranks and out["zero_stage"] == 2 and out["precision"] == "fp32"
    assert out["tokens_per_step"] == 2 * ranks * 32
    assert out["results"]["hf"]["model"].startswith(hf_model)
    ours, hf = out["results"]["ours"], out["results"]["hf"]
    for r in (ours, hf):
        assert r["tokens_per_s"] == pytest.approx(out["tokens_per_step"] / r["step_s"])
        assert r["flops_per_s"] == pytest.approx(r["tokens_per_s"] * out["flops_per_token"])
        assert 0 < r["mfu"] <= 1.0  # against a peak measured in the same run: above 100% would be a wrong peak
        assert 0 < r["final_loss"] < 10  # a real loss, not NaN
    assert out["ratio_ours_hf"] == pytest.approx(ours["tokens_per_s"] / hf["tokens_per_s"])
    # the same parameter count: the comparison is shape for shape (ours adds only the vocabulary padding rows)
    pad_rows = (out["padded_vocab_size"] - out["vocab_size"]) * out["n_embd"]
    assert ours["params"] - pad_rows == hf["params"]


def test_gpt2_vs_hf_one_rank(tmp_path):
    out = run_bench([sys.executable, str(BENCH), "--model", "tiny", *SHAPE], tmp_path)
    check(out, 1, "GPT2LMHeadModel")


def test_gpt25_vs_hf_llama_one_rank(tmp_path):
    out = run_bench([sys.executable, str(BENCH), "--model", "tiny", "--set", "mlp=swiglu", "--set", "norm=rmsnorm",
                     "--set", "pos_emb=rope", "--set", "bias=false", *SHAPE], tmp_path)
    check(out, 1, "LlamaForCausalLM")


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher(tmp_path):
    from trainer.dist import free_port

    out = run_bench([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
                     str(free_port()), str(BENCH), "--model", "tiny", *SHAPE], tmp_path)
    check(out, 2, "GPT2LMHeadModel")


def test_sample_efficiency_reads_the_tokens_where_a_curve_crosses_the_target():
    """bench/sample_efficiency.py's headline number: interpolated between evaluations, None if never reached."""
    sys.path.insert(0, str(ROOT / "bench"))
    from sample_efficiency import tokens_to_reach

    curve = [(100, 3.0), (200, 2.5), (300, 2.0)]
    assert tokens_to_reach(curve, 2.25) == pytest.approx(250)
    assert tokens_to_reach(curve, 3.5) == 100 and tokens_to_reach(curve, 2.0) == 300
    assert tokens_to_reach(curve, 1.9) is None
