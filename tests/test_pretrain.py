"""Pretraining end to end on real DeepSpeed processes (tiny preset, CPU, gloo).

Each case launches the CLI the way users do (plain python, the deepspeed launcher, torchrun) and
reads RUN/metrics.jsonl, so these tests see exactly what a user would see.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_ARGS, events, launch_env, metrics, run_cli, training_records

from trainer.config import TrainConfig
from trainer.errors import UserError
from trainer.train.batching import choose_micro_batch, plan_batches

GOLDEN = Path(__file__).resolve().parent / "golden" / "tiny_loss.json"
TINY = [*TINY_ARGS, "--eval-batches", "2", "--save-every", "0"]


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in training_records(run_dir)]


# ---- batch arithmetic ---------------------------------------------------------------------------

def test_global_batch_sets_accumulation():
    plan = plan_batches(TrainConfig(micro_batch=4, global_batch=32, seq_len=64), block_size=64, world_size=2)
    assert (plan.grad_accum, plan.global_batch, plan.tokens_per_step) == (4, 32, 2048)


def test_global_batch_tokens_sets_accumulation():
    plan = plan_batches(TrainConfig(micro_batch=2, global_batch_tokens=1024, seq_len=64), 64, 1)
    assert plan.grad_accum == 8


def test_indivisible_global_batch_is_explained():
    with pytest.raises(UserError, match="not divisible by ranks x micro-batch = 2 x 4 = 8"):
        plan_batches(TrainConfig(micro_batch=4, global_batch=20, seq_len=64), 64, 2)


def test_seq_len_longer_than_block_size_is_refused():
    with pytest.raises(UserError, match="block_size 64"):
        plan_batches(TrainConfig(seq_len=128), 64, 1)


def test_micro_batch_auto_is_the_largest_the_estimate_fits_that_keeps_the_global_batch():
    """Against estimate-memory's own answer for the same model, config and GPU (its largest micro-batch)."""
    from click.testing import CliRunner

    import models
    from trainer.cli import cli
    from trainer.engine.ds_config import load_ds_config
    from trainer.memory import model_config

    shown = CliRunner().invoke(cli, ["estimate-memory", "--model", "gpt2-medium", "--gpus", "2", "--seq-len", "1024",
                                     "--gpu-memory", "24", "--json"])
    fits = json.loads(shown.output.strip().splitlines()[-1])["max_micro_batch"]
    arch = model_config("gpt2-medium")
    assert isinstance(arch, models.ModelConfig) and fits > 2
    for global_batch, expected in ((None, fits), (64, max(d for d in range(1, fits + 1) if 32 % d == 0)),
                                   (2, 1)):
        cfg = TrainConfig(micro_batch="auto", global_batch=global_batch, seq_len=1024)
        micro, line = choose_micro_batch(cfg, arch, load_ds_config("zero2_bf16"), 2, 24.0)
        assert micro == expected and f"fits {fits}" in line or global_batch is None, (global_batch, micro, line)
        plan = plan_batches(TrainConfig(micro_batch=micro, global_batch=global_batch, seq_len=1024), 1024, 2)
        assert global_batch is None or plan.global_batch == global_batch
    assert choose_micro_batch(TrainConfig(micro_batch="auto"), arch, load_ds_config("zero2_bf16"), 1, None)[0] == 8
    with pytest.raises(UserError, match="not even one sequence"):
        choose_micro_batch(TrainConfig(micro_batch="auto", seq_len=1024), arch, load_ds_config("zero0_bf16"), 1, 2.0)
    with pytest.raises(UserError, match="pass --set block_size=2048"):  # what plan_batches says, said first
        choose_micro_batch(TrainConfig(micro_batch="auto", seq_len=2048), arch, load_ds_config("zero2_bf16"), 1, 24.0)


# ---- real runs ------------------------------------------------------------------------------------

def test_single_process_run_writes_metrics_tensorboard_and_checkpoint(data, tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "8",
                    "--eval-every", "4", "--ds-config", "zero2_fp32", "--json"])
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 8 and result["val_loss"] is not None
    records = metrics(run)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert set(train[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "mfu", "skipped"}
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8]
    assert train[-1]["loss"] < train[0]["loss"]
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000008"
    assert (run / "checkpoints" / "step_0000008" / "COMPLETE").is_file()
    assert (run / "config.yaml").is_file()
    assert "eval-ppl --model-path" in proc.stdout  # tells the user what to do next


def test_two_ranks_zero2_bf16_loss_decreases_and_matches_golden(data, tmp_path):
    run = tmp_path / "run"
    run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "10",
             "--ds-config", "zero2_bf16", "--global-batch", "8"], ranks=2)
    curve = losses(run)
    assert len(curve) == 10 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.5, curve
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"config": "tiny, 2 ranks, zero2_bf16, seed 7", "loss": curve}, indent=1))
    golden = json.loads(GOLDEN.read_text())["loss"]
    # bf16 on CPU is deterministic for a fixed build; a small tolerance absorbs kernel changes only.
    assert curve == pytest.approx(golden, abs=2e-2), "numerics drifted from tests/golden/tiny_loss.json"


@pytest.mark.slow
def test_zero_stages_give_the_same_curve(data, tmp_path):
    curves = {}
    for stage in (0, 1, 2):
        run = tmp_path / f"zero{stage}"
        run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "5",
                 "--ds-config", f"zero{stage}_bf16", "--global-batch", "8", "--tracking"], ranks=2)
        curves[stage] = losses(run)
    assert curves[1] == pytest.approx(curves[2], abs=1e-3), curves
    # ZeRO-0 with bf16 runs DeepSpeed's FP16_Optimizer in bf16 mode, whose Adam sees loss-scaled
    # gradients (eps acts differently on near-zero gradients): close, not identical.
    assert curves[0] == pytest.approx(curves[2], abs=0.1), curves


def test_zero2_matches_a_plain_pytorch_reference(data, tmp_path):
    """The whole step (data order, loss, warmup, clipping, weight-decay groups, fp32 master AdamW on a
    bf16 model) agrees with a few lines of plain PyTorch doing the same thing."""
    import torch

    import models
    from trainer.data.shards import Dataset, TrainStream
    from trainer.train.optim import param_groups

    run = tmp_path / "run"
    run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "3", "--warmup-steps",
             "0", "--schedule", "constant", "--ds-config", "zero2_bf16"])
    records = [r for r in metrics(run) if "loss" in r]

    dataset = Dataset.open(data)
    torch.manual_seed(7)
    model = models.GPT(models.get_config("tiny", vocab_size=dataset.vocab_size, padded_vocab_size=320)).bfloat16()
    master = [p.detach().float().clone() for p in model.parameters()]
    groups = param_groups(model, 0.1)
    ids = {id(p): i for i, p in enumerate(model.parameters())}
    optimizer = torch.optim.AdamW([{"params": [master[ids[id(p)]] for p in g["params"]],
                                    "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    stream = TrainStream(dataset, 64, 4, seed=7)
    for step, record in enumerate(records):
        x, y = stream.local_batch(step * 4, 0, 1)
        loss = model(x, y)  # the model's own loss (tests/test_loss.py: equal to lm_loss of its logits)
        loss.backward()
        for m, p in zip(master, model.parameters()):
            m.grad, p.grad = p.grad.float(), None
        norm = torch.nn.utils.clip_grad_norm_(master, 1.0)
        assert record["loss"] == pytest.approx(loss.item(), abs=1e-4)
        assert record["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
        assert record["lr"] == pytest.approx(3e-3)
        optimizer.step()
        with torch.no_grad():
            for m, p in zip(master, model.parameters()):
                p.copy_(m)


def test_zero3_trains_like_zero2(data, tmp_path):
    """ZeRO-3 gathers a module's parameters around its forward: the loss is computed inside the LM head's
    forward (models/layers.py), so the tied head weight is whole there and in backward."""
    runs = {}
    for ds in ("zero2_bf16", "zero3_bf16"):
        runs[ds] = tmp_path / ds
        run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(runs[ds]), "--max-steps", "4",
                 "--ds-config", ds, "--eval-every", "4"])
    z2, z3 = (metrics(runs[ds]) for ds in ("zero2_bf16", "zero3_bf16"))
    assert [r["loss"] for r in z3 if "loss" in r] == pytest.approx([r["loss"] for r in z2 if "loss" in r], abs=2e-3)
    assert [r["val_loss"] for r in z3 if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in z2 if "val_loss" in r], abs=2e-3)


@pytest.mark.extended
def test_compile_trains_like_eager_and_its_run_resumes_exports_and_evaluates(data, tmp_path):
    """--compile (torch.compile through DeepSpeed's hook) runs the same model and loss, chunked loss included; the
    compile time is logged; the compiled run's checkpoint resumes (compiled again), exports and evaluates."""
    runs = {}
    for mode in ("--no-compile", "--compile"):
        runs[mode] = tmp_path / mode.strip("-")
        run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(runs[mode]), "--max-steps", "3",
                 "--ds-config", "zero2_fp32", mode])
    assert losses(runs["--compile"]) == pytest.approx(losses(runs["--no-compile"]), abs=1e-4)
    compiled = runs["--compile"]
    assert [e["step"] for e in events(compiled) if e["event"] == "compile"] == [1]
    proc = run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(compiled), "--max-steps", "5",
                    "--ds-config", "zero2_fp32", "--compile"])
    assert "resumed from" in proc.stdout and "torch.compile: first step" in proc.stdout
    run_cli([compiled, tmp_path / "hf", "--hf"], script=REPO / "tools" / "zero_to_fp32.py")
    ppl = json.loads(run_cli(["eval-ppl", "--model-path", compiled, "--max-tokens", "500", "--no-progress",
                              "--json"]).stdout.strip().splitlines()[-1])
    assert math.isfinite(ppl["ppl"])


COMPILE_WITH = '''
import sys
import time
from trainer.engine import build as ds_engine
from trainer.cli import cli

{backend}

real = ds_engine.compile_model
ds_engine.compile_model = lambda engine: real(engine, backend=backend)
cli.main(["pretrain", *sys.argv[1:]])
'''

COMPILE_FAILS = COMPILE_WITH.format(backend='''
def backend(graph, inputs):  # a compile failure, as a broken toolchain
    raise RuntimeError("this backend cannot compile")
''')

COMPILE_TAKES_6_S = COMPILE_WITH.format(backend='''
compiled = []

def backend(graph, inputs):  # a slow compilation, as inductor's on a big model
    if not compiled:
        time.sleep(6)
        compiled.append(graph)
    return graph.forward
''')


def test_a_compile_failure_falls_back_to_eager_in_one_line(data, tmp_path):
    """torch.compile fails at the first forward (before anything is applied): one line, the step is taken eagerly,
    and the run equals an eager one bitwise. Without a C++ compiler, a CPU run does not try."""
    script = tmp_path / "fails.py"
    script.write_text(COMPILE_FAILS)
    args = [*TINY, "--data", str(data), "--max-steps", "3", "--ds-config", "zero2_fp32"]
    proc = run_cli([*args, "--out", str(tmp_path / "fallback"), "--compile"], script=script)
    said = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "torch.compile failed" in line]
    assert len(said) == 1 and "this backend cannot compile" in said[0] and "training eagerly" in said[0], said
    run_cli(["pretrain", *args, "--out", str(tmp_path / "eager"), "--no-compile"])
    assert losses(tmp_path / "fallback") == losses(tmp_path / "eager")
    env = launch_env(CXX=str(tmp_path / "no-such-compiler"))
    proc = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", *args, "--out", str(tmp_path / "nocxx"),
                           "--compile"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "needs a C++ compiler" in proc.stdout and "training eagerly" in proc.stdout


def test_the_compiling_step_does_not_shorten_a_max_time_budget(data, tmp_path):
    """--max-time keeps room for the slowest step; the first step of a compiled run, which compiles, is not
    taken as one: with a 10 s budget a 6 s compilation leaves time for the other steps."""
    script = tmp_path / "slow.py"
    script.write_text(COMPILE_TAKES_6_S)
    proc = run_cli([*TINY, "--data", str(data), "--max-steps", "3", "--ds-config", "zero2_fp32", "--eval-every", "0",
                    "--out", str(tmp_path / "run"), "--compile", "--max-time", "10s"], script=script)
    assert "max-time reached" not in proc.stdout, proc.stdout
    assert [e["step"] for e in events(tmp_path / "run") if e["event"] == "compile"] == [1]
    assert len(losses(tmp_path / "run")) == 3


@pytest.mark.slow
def test_torchrun_two_nodes_of_one_rank(data, tmp_path):
    run = tmp_path / "run"
    from trainer.dist import free_port

    port = str(free_port())
    common = ["--nnodes", "2", "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port]
    args = ["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "4",
            "--ds-config", "zero2_fp32", "--global-batch", "8"]
    env = launch_env()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *common, "--node_rank", str(node),
                               "-m", "trainer.cli", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    assert len(losses(run)) == 4


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(data, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    env = launch_env()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.cli", "pretrain", *TINY, "--data", str(data),
                             "--out", str(run), "--max-steps", "100000", "--ds-config", "zero2_fp32", "--json"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(metrics(run)) >= 3) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["stopped"] == "signal SIGTERM" and 3 <= result["step"] < 100000
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{result['step']:07d}" and (run / "checkpoints" / latest / "COMPLETE").is_file()


def test_zero3_on_two_ranks_evaluates_an_odd_number_of_batches_and_examples(data, tmp_path):
    """Every rank runs the same number of forwards in evaluation: under ZeRO-3 each forward gathers the
    parameters collectively, so one validation batch (or 5 HellaSwag examples) on 2 ranks must not leave
    one rank waiting for a forward the other never runs (a hang after training)."""
    run = tmp_path / "run"
    run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "2",
             "--ds-config", "zero3_bf16", "--global-batch", "8", "--set", "n_embd=256", "--eval-every", "2",
             "--eval-batches", "1", "--hellaswag-every", "2",
             "--hellaswag-jsonl", str(REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl")],
            ranks=2, timeout=240)
    records = metrics(run)
    assert [r["step"] for r in records if "val_loss" in r] == [2]
    assert [r["hellaswag_n"] for r in records if "hellaswag_n" in r] == [5]


def test_throughput_counts_training_time_only(data, tmp_path):
    """Evaluation and saves are timed on their own records, not in the training rate: the step logged right
    after an evaluation must not read slower for the evaluation's time in its window."""
    run = tmp_path / "run"
    run_cli(["pretrain", *TINY, "--data", str(data), "--out", str(run), "--max-steps", "12",
             "--ds-config", "zero2_fp32", "--eval-every", "3", "--eval-batches", "60", "--save-every", "3"])
    records = metrics(run)
    evals = [r for r in records if "val_loss" in r]
    saves = [e for e in events(run) if e["event"] == "save"]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert [r["step"] for r in evals] == [3, 6, 9, 12] and [r["step"] for r in saves] == [3, 6, 9, 12]
    assert all(r["seconds"] > 0 and r["checkpoint"] == f"step_{r['step']:07d}" for r in saves)
    tokens_per_step = 8 * 64
    for r in evals[:-1]:
        # Had the evaluation's time been counted, the next step's window would have lasted longer than the
        # evaluation alone, so its rate would be below tokens / eval_seconds.
        assert steps[r["step"] + 1]["tokens_per_s"] > tokens_per_step / r["eval_seconds"], (r, steps[r["step"] + 1])


def test_excluded_time_leaves_the_training_rate(tmp_path, monkeypatch):
    """The run log's accounting with a fake clock: 2 s steps, a 30 s evaluation between them."""
    import torch

    from trainer.config import TrainConfig
    from trainer.train import runlog
    from trainer.train.state import TrainState

    now = [0.0]
    monkeypatch.setattr(runlog.time, "perf_counter", lambda: now[0])
    log = runlog.RunLog(tmp_path, TrainConfig(log_every=1, tracking=False), total_steps=3, start_step=0,
                        start_tokens=0, flops_per_token=0.0, peak_flops=0.0, world_size=1, device=torch.device("cpu"))
    state = TrainState()
    for step in range(3):
        now[0] += 2.0  # the step
        state.advance(global_batch=4, seq_len=50, skipped=False)
        log.step(state, torch.tensor(1.0), lr=1e-3, grad_norm=1.0, skipped=False, last=step == 2)
        with log.excluded() as timing:
            now[0] += 30.0  # evaluation, HellaSwag or a save
    log.close()
    rates = [r["tokens_per_s"] for r in metrics(tmp_path)]
    assert rates == [100.0, 100.0, 100.0] and timing["seconds"] == 30.0


# ---- first contact: nothing to compile --------------------------------------------------------------

def test_default_runs_build_no_extension(data, tmp_path):
    """A default run (auto config: ZeRO-2, torch's AdamW) and a Muon run with default options JIT-build no C++
    op, the single process's shared-memory all-reduce included: torch's extension folder stays empty."""
    extensions = tmp_path / "torch_extensions"
    env = launch_env(TORCH_EXTENSIONS_DIR=str(extensions))
    default = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", *TINY, "--data", str(data), "--out",
                              str(tmp_path / "default"), "--max-steps", "2"], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=600)
    assert default.returncode == 0, default.stderr[-3000:]
    assert "torch.optim.AdamW (foreach)" in default.stdout
    muon = subprocess.run([sys.executable, "-m", "trainer.cli", "pretrain", *TINY, "--data", str(data), "--out",
                           str(tmp_path / "muon"), "--max-steps", "2", "--global-batch", "8",
                           "--ds-config", "zero2_muon_bf16"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert muon.returncode == 0, muon.stderr[-3000:]
    assert muon.stdout.count("grad-clip off") == 1  # the default follows Muon under ZeRO-2, said once
    assert "Muon (standard Newton-Schulz) + torch.optim.AdamW (foreach)" in muon.stdout  # bf16 on a CPU
    assert not extensions.exists() or not any(extensions.iterdir()), sorted(extensions.rglob("*"))[:10]


OPTIMIZER_PROBE = '''
import json, sys
from trainer.train import loop
from trainer.config import resolve
from trainer.checkpoint.engine_io import _base_optimizer

data, out = sys.argv[1:3]
found = {}
for ds in ("zero0_bf16", "zero2_bf16", "zero3_bf16", "zero2_muon_bf16"):
    run = loop.setup(resolve(None, {"model": "tiny", "data": data, "out": f"{out}/{ds}", "ds_config": ds,
                                         "seq_len": 64, "micro_batch": 4, "max_steps": 1}))
    base = _base_optimizer(run.engine)
    base = getattr(base, "aux_optimizer", None) or base
    found[ds] = [type(base).__module__ + "." + type(base).__name__,
                 sorted({(g["fused"], g["foreach"]) for g in base.param_groups})]
print(json.dumps(found))
'''


def test_deepspeed_builds_torch_adamw_with_the_flags_the_run_names(data, tmp_path):
    """What the engines really hold under each ZeRO stage (and as Muon's AdamW): torch.optim.AdamW, foreach here."""
    script = tmp_path / "probe.py"
    script.write_text(OPTIMIZER_PROBE)
    proc = run_cli([str(data), str(tmp_path)], script=script)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for ds, (cls, flags) in found.items():
        assert cls == "torch.optim.adamw.AdamW" and flags == [[False, True]], (ds, cls, flags)
