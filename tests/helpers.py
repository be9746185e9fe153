"""Shared test helpers: tiny models, launching the CLI as users do, reading a run directory (imported by test
modules, which never import each other; pytest puts tests/ on sys.path)."""
import contextlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import models


def random_model(vocab_size: int = 257, **overrides) -> models.GPT:
    """A tiny byte-level model with norms and biases moved off their init values (so parity sees them),
    in eval mode, the same weights on every call."""
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=vocab_size, **overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p)) if p.dim() == 1 else p.mul_(3.0)
    return model



LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def single_process_env():
    """os.environ without launcher variables for the duration: lm-eval's HF model (through accelerate) reads a
    LOCAL_RANK left by an in-process run as a distributed launch."""
    saved = {k: os.environ.pop(k) for k in LAUNCHER_VARIABLES if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# ---- launching the CLI the way users do ----------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
# On a GPU the suite's bitwise comparisons hold under --deterministic (on a CPU steps are bitwise anyway).
ON_GPU = torch.cuda.is_available()
EXACT = ["--deterministic"] if ON_GPU else []
# The tiny run most end-to-end tests train (each adds its length, cadence and DeepSpeed config).
TINY_ARGS = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--lr", "3e-3", "--warmup-steps", "2",
             "--min-lr", "3e-4", "--eval-every", "0", "--log-every", "1", "--seed", "7", *EXACT]


def available_ranks() -> int:
    """Ranks a launch here can have: one per GPU, or (CPU ranks share the cores) any number."""
    return torch.cuda.device_count() if ON_GPU else 1 << 10
PORTS = set()  # master ports of multi-rank launches (DeepSpeed's CPU all-reduce would name /dev/shm buffers by them)


def launch_env(**extra) -> dict:
    """The environment of a child launch: the repository importable, one thread per rank, no launcher variables."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}
    for key in LAUNCHER_VARIABLES:
        env.pop(key, None)
    return env


def cli_command(args, ranks: int = 1, script=None) -> list:
    """`python -m trainer.cli ARGS` (or `python SCRIPT ARGS`) on one rank; under the deepspeed launcher on more.
    A test asking for more ranks than this machine has GPUs is skipped."""
    from trainer.dist import free_port

    if ranks > available_ranks():
        import pytest

        pytest.skip(f"{ranks} ranks need {ranks} GPUs; this machine has {available_ranks()}")

    if ranks == 1:
        return [sys.executable, *([str(script)] if script else ["-m", "trainer.cli"]), *map(str, args)]
    port = free_port()
    PORTS.add(port)
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
            *([str(script)] if script else ["--module", "trainer.cli"]), *map(str, args)]


def run_cli(args, ranks: int = 1, check: bool = True, timeout: int = 600, script=None, env=None,
            preexec_fn=None) -> subprocess.CompletedProcess:
    """Run a launch to its end (a hang past `timeout` is a failure); with `check`, a non-zero exit is one too."""
    cmd = cli_command(args, ranks, script)
    proc = subprocess.run(cmd, cwd=REPO, env=env or launch_env(), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=preexec_fn)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def start_cli(args, log: Path, ranks: int = 2) -> subprocess.Popen:
    """Start a launch in its own session (so os.killpg reaches the launcher and every rank), output to `log`."""
    out = open(log, "w")
    return subprocess.Popen(cli_command(args, ranks), cwd=REPO, env=launch_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().split("\n")[:-1]] if path.is_file() else []


def metrics(run_dir) -> list[dict]:
    """Every complete record of RUN/metrics.jsonl (a line still being written has no newline yet)."""
    return _json_lines(Path(run_dir) / "metrics.jsonl")


def training_records(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r]


def step_records(run_dir) -> list[dict]:
    """One training record per step (a resumed run appends; the last record of a step wins)."""
    last = {r["step"]: r for r in training_records(run_dir)}
    return [last[s] for s in sorted(last)]


def curve(run_dir, key: str) -> list:
    return [r[key] for r in step_records(run_dir)]


def warmup_cosine(step: int, max_lr: float, min_lr: float, total: int, warmup: int = 2) -> float:
    """Linear warmup + cosine to min_lr at `total`, written out independently of trainer/train/optim.py."""
    if step < warmup:
        return max_lr * (step + 1) / warmup
    return min_lr + (max_lr - min_lr) * (1 + math.cos(math.pi * min(1, (step - warmup) / (total - warmup)))) / 2


def events(run_dir) -> list[dict]:
    return _json_lines(Path(run_dir) / "events.jsonl")


def shm_buffers() -> list[Path]:
    """DeepSpeed's CPU all-reduce buffers in /dev/shm named after the launches of this test session."""
    return [f for port in PORTS for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*")]


# ---- a dataset and model that produce non-finite steps where chosen ------------------------------------

POISON = 255


def poisoned(data_dir, out, steps, seq: int = 64, global_batch: int = 8, seed: int = 7) -> tuple:
    """(dataset, model dir): the dataset's windows for `steps` (1-based) of a run with this sequence length,
    global batch and seed contain POISON; the tiny model's (untied) embedding row for it is NaN.

    POISON is byte 0xFF (never in UTF-8 text, so nowhere else in the corpus): exactly the batches holding it
    produce a NaN loss and NaN gradients; every other batch never reads that row."""
    from trainer.data.shards import Dataset, TrainStream, write_shard

    dataset_dir = out / "data"
    shutil.copytree(data_dir, dataset_dir)
    dataset = Dataset.open(dataset_dir)
    stream = TrainStream(dataset, seq, global_batch, seed)
    shards = [np.array(s) for s in dataset.train_shards]
    for step in steps:
        for sample in range((step - 1) * global_batch, step * global_batch):
            window = stream.sample(sample)
            for shard in shards:  # find the window in its shard by content (the stream's own mapping)
                hits = np.flatnonzero(shard[:-seq] == window[0])
                hit = next((h for h in hits if h % seq == 0 and np.array_equal(shard[h:h + seq + 1], window)), None)
                if hit is not None:
                    shard[hit + seq // 2] = POISON
                    break
            else:
                raise AssertionError(f"window of sample {sample} not found")
    for path, tokens in zip(sorted(dataset_dir.glob("train_*.bin")), shards):
        write_shard(path, tokens, vocab_size=dataset.vocab_size)  # same token counts: meta.json stays valid
    check = TrainStream(Dataset.open(dataset_dir), seq, global_batch, seed)
    assert all(POISON in check.local_batch((s - 1) * global_batch, 0, 1)[0] for s in steps)
    assert POISON not in check.local_batch(max(steps) * global_batch, 0, 1)[0]
    torch.manual_seed(0)
    model = models.GPT(models.get_config("tiny", vocab_size=dataset.vocab_size, padded_vocab_size=320,
                                         tie_embeddings=False))
    with torch.no_grad():
        model.transformer.wte.weight[POISON] = float("nan")
    models.save(model, out / "model")
    return dataset_dir, out / "model"


def equal_state(a: dict, b: dict) -> bool:
    """Two state dicts with the same keys and bitwise equal tensors."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal, NaN where the other is NaN (a poisoned embedding row stays NaN)."""
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


# ---- running CLI jobs in one process ------------------------------------------------------------------

def _drive(jobs_file: str, results_file: str) -> None:
    """Run the jobs of `jobs_file` in this process; write {name: {...}} to `results_file`.

    Hub downloads are replaced at the boundary: `datasets.load_dataset` returns the pydoc corpus as
    records with a `text` field and remembers what was asked for. Everything after it (tokenizing,
    sharding, pretraining) is the real code path.
    """
    from unittest import mock

    import datasets
    from click.testing import CliRunner

    import tools.convert_shards
    from trainer.cli import cli
    from trainer.train import pretrain

    asked = []

    def load_dataset(name, config=None, split=None, streaming=False, **kwargs):
        from pydoc_data.topics import topics

        asked.append([name, config, split, streaming])
        return ({"text": topics[key]} for key in sorted(topics))

    real_run = pretrain.run
    results = {}
    for job in json.loads(Path(jobs_file).read_text()):
        entry = results.setdefault(job["name"], {})
        try:
            if job.get("convert"):
                asked.clear()
                with mock.patch.object(datasets, "load_dataset", load_dataset):
                    out = CliRunner().invoke(tools.convert_shards.main, job["convert"], catch_exceptions=False)
                assert out.exit_code == 0, out.output
                entry["hub"] = list(asked)
            captured = {}

            def run(cfg, json_output=False):
                captured["config"] = cfg.to_dict()
                started = time.time()
                captured["result"] = real_run(cfg, json_output)
                captured["seconds"] = time.time() - started

            with mock.patch.object(pretrain, "run", run):
                cli.main(["pretrain", *job["pretrain"]], standalone_mode=False)
            entry.update(captured)
        except BaseException as e:  # recorded for the test that owns the job; the other jobs still run
            entry["error"] = f"{type(e).__name__}: {e}"
    Path(results_file).write_text(json.dumps(results, default=str))


def drive(jobs: list[dict], root: Path) -> dict:
    """Run `jobs` with `_drive` in one fresh Python process (a plain single-rank launch); returns its results."""
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = launch_env(WANDB_MODE="offline", WANDB_SILENT="true", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    code = f"import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]; from helpers import _drive; " \
           f"_drive({str(root / 'jobs.json')!r}, {str(root / 'results.json')!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.returncode != 0 or not (root / "results.json").is_file():
        raise AssertionError(f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads((root / "results.json").read_text())
