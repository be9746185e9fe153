"""bench/train_throughput.py: both models really train through the same engine, and its figures are real:
shapes and parameter counts as transformers counts them, MFU below the peak measured in the same run,
and tokens/s no higher than the tokens it timed over the time the whole process took."""
import json
import subprocess
import sys
import time

import pytest
from helpers import REPO, launch_env, run_cli

BENCH = REPO / "bench" / "train_throughput.py"
STEPS, WARMUP, REPEATS = 2, 1, 1
SHAPE = ["--seq-len", "32", "--micro-batch", "2", "--steps", str(STEPS), "--warmup", str(WARMUP), "--repeats",
         str(REPEATS), "--ds-config", "zero2_fp32", "--json"]


def run_bench(args, tmp_path, ranks=1) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = run_cli(args, ranks=ranks, script=BENCH, env=launch_env(TMPDIR=str(tmp_path)))  # synthetic data there
    elapsed = time.perf_counter() - started
    assert "ours / hf:" in proc.stdout  # the table a user reads
    return json.loads(next(line for line in reversed(proc.stdout.splitlines()) if line.startswith("{"))), elapsed


def check(out: dict, elapsed: float, ranks: int, hf_model: str):
    assert out["ranks"] == ranks and out["zero_stage"] == 2 and out["precision"] == "fp32"
    assert out["tokens_per_step"] == 2 * ranks * 32  # micro-batch x ranks x sequence length
    assert out["results"]["hf"]["model"].startswith(hf_model)
    ours, hf = out["results"]["ours"], out["results"]["hf"]
    for r in (ours, hf):
        # Every timed step happened inside this process: the rate cannot beat the tokens over the process's time.
        assert r["tokens_per_s"] * elapsed >= (WARMUP + STEPS * REPEATS) * out["tokens_per_step"] > 0
        assert 0 < r["mfu"] <= 1.0  # against a peak measured in the same run: above 100% would be a wrong peak
        assert 0 < r["final_loss"] < 10  # a real loss, not NaN
    # the same parameter count as transformers counts its model (ours adds only the vocabulary padding rows)
    pad_rows = (out["padded_vocab_size"] - out["vocab_size"]) * out["n_embd"]
    assert ours["params"] - pad_rows == hf["params"]


def test_gpt2_vs_hf_one_rank(tmp_path):
    check(*run_bench(["--model", "tiny", *SHAPE], tmp_path), 1, "GPT2LMHeadModel")


def test_gpt25_vs_hf_llama_one_rank(tmp_path):
    check(*run_bench(["--model", "tiny", "--set", "mlp=swiglu", "--set", "norm=rmsnorm", "--set", "pos_emb=rope",
                      "--set", "bias=false", *SHAPE], tmp_path), 1, "LlamaForCausalLM")


@pytest.mark.slow
def test_two_ranks_under_the_deepspeed_launcher(tmp_path):
    check(*run_bench(["--model", "tiny", *SHAPE], tmp_path, ranks=2), 2, "GPT2LMHeadModel")


def test_sample_efficiency_reads_the_tokens_where_a_curve_crosses_the_target():
    """bench/sample_efficiency.py's headline number: interpolated between evaluations, None if never reached."""
    sys.path.insert(0, str(REPO / "bench"))
    from sample_efficiency import tokens_to_reach

    curve = [(100, 3.0), (200, 2.5), (300, 2.0)]
    assert tokens_to_reach(curve, 2.25) == pytest.approx(250)
    assert tokens_to_reach(curve, 3.5) == 100 and tokens_to_reach(curve, 2.0) == 300
    assert tokens_to_reach(curve, 1.9) is None


@pytest.mark.extended
def test_the_gpu_report_runs_at_smoke_size_and_finds_cpu_steps_bitwise(tmp_path):
    """bench/gpu_report.py --smoke, as CI keeps it working: every section runs (memory needs a GPU and says so),
    and on a CPU two runs and a paused-and-resumed one are bitwise, with --deterministic and without."""
    proc = subprocess.run([sys.executable, "bench/gpu_report.py", "--smoke", "--work", str(tmp_path), "--json"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for section in ("versions", "doctor", "bench", "loop", "adam", "muon", "memory", "exactness"):
        assert "error" not in report[section], (section, report[section])
    assert report["doctor"]["problems"] == 0 and "torch.optim.AdamW" in report["doctor"]["optimizer"]
    assert report["bench"]["ours"]["tokens_per_s"] > 0 and report["muon"]["muon_over_adamw"] > 0
    assert report["adam"]["torch_over_fusedadam"] > 0  # DeepSpeed's FusedAdam, built for the CPU here
    for mode in ("deterministic", "default"):
        assert report["exactness"][mode]["two_runs_bitwise"] and report["exactness"][mode]["resumed_bitwise"], mode
