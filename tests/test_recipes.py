"""Recipes: the configs/*.yaml run configs say what the published recipes say, and each runs end to end.

End to end = the recipe's own data command (read from the YAML's `# Data:` comment) with the hub
download replaced at the boundary (`datasets.load_dataset` streams the pydoc corpus instead), then
`pretrain --config configs/X.yaml` at tiny size for 3 steps on those shards. The model keeps the
recipe's preset and overrides (GPT-2.5 stays RMSNorm/SwiGLU/RoPE, the rotary variant keeps
rotary_dim 32); only depth and width shrink. `--epochs`, `--max-time` and W&B offline logging ride
in the same process: every job runs inside ONE Python process (`_drive`), which pays the DeepSpeed
import once instead of per run.
"""
import json
import math
import shlex
from pathlib import Path

import pytest
from helpers import drive, metrics, run_cli

from trainer.config import parse_duration, resolve
from trainer.engine.ds_config import load_ds_config, uses_muon

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
HELLASWAG = REPO / "tests" / "fixtures" / "hellaswag_tiny.jsonl"

# What issue 10 asks of each recipe: TrainConfig fields, model fields, HF dataset (name, config).
RECIPES = {
    "gpt2-wikitext103": dict(
        train=dict(model="gpt2", weight_decay=1.1, epochs=25, global_batch=64, schedule="cosine", min_lr=1e-6),
        arch=dict(dropout=0.06, rotary_dim=0, pos_emb="learned"),
        source=("Salesforce/wikitext", "wikitext-103-raw-v1"), tokenizer="gpt2", result="16.29"),
    "gpt2-rotary-wikitext103": dict(
        train=dict(model="gpt2", weight_decay=1.1, epochs=25, global_batch=64, schedule="cosine", min_lr=1e-6),
        arch=dict(dropout=0.06, rotary_dim=32, pos_emb="learned", norm="layernorm"),
        source=("Salesforce/wikitext", "wikitext-103-raw-v1"), tokenizer="gpt2", result=None),
    "gpt2-openwebtext": dict(
        train=dict(model="gpt2", weight_decay=0.1, lr=5e-4, epochs=3, global_batch=100, seq_len=1024),
        arch=dict(dropout=0.0),
        source=("Skylion007/openwebtext", None), tokenizer="gpt2", result="18.84"),
    "gpt2-medium-fineweb-edu-2x24gb": dict(
        train=dict(model="gpt2-medium", lr=1e-4, ds_config="zero2_bf16", activation_checkpointing=True,
                   max_time="24h"),
        arch=dict(n_layer=24, n_embd=1024),
        source=("HuggingFaceTB/smollm-corpus", "fineweb-edu-dedup"), tokenizer="gpt2", result="RTX 4090"),
    "gpt25-fineweb10b": dict(
        train=dict(model="gpt25", global_batch_tokens=524_288, seq_len=1024, max_steps=80_000, lr=1.8e-3,
                   beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, schedule="cosine"),
        arch=dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False),
        source=("HuggingFaceFW/fineweb", "sample-10BT"), tokenizer="gpt2", result="3.12"),
    "gpt2-fineweb-edu-10b": dict(
        train=dict(model="gpt2", global_batch_tokens=524_288, seq_len=1024, lr=6e-4, warmup_steps=715,
                   max_steps=19_073, schedule="cosine"),
        arch=dict(norm="layernorm", pos_emb="learned"),
        source=("HuggingFaceFW/fineweb-edu", "sample-10BT"), tokenizer="gpt2", result="3.03"),
    "gpt25-speedrun": dict(
        train=dict(model="gpt25-speedrun", ds_config="zero2_muon_bf16", global_batch_tokens=524_288, seq_len=1024,
                   schedule="wsd", decay_frac=0.3, grad_clip=0.0, muon_momentum=0.95, weight_decay=0.0),
        arch=dict(norm="rmsnorm", mlp="swiglu", pos_emb="rope", bias=False, qk_norm=True),
        source=("HuggingFaceFW/fineweb", "sample-10BT"), tokenizer="gpt2", result=None),
}
# Tiny size for CPU: width 128 with 2 heads keeps head_dim 64, so rotary_dim 32 stays valid.
TINY_SIZE = ["--set", "n_layer=2", "--set", "n_head=2", "--set", "n_embd=128", "--set", "block_size=64"]
TINY_RUN = ["--seq-len", "64", "--micro-batch", "2", "--max-steps", "3",
            "--log-every", "1", "--eval-every", "2", "--eval-batches", "2", "--save-every", "0"]
SMALL = ["--model", "tiny", "--seq-len", "64", "--ds-config", "zero2_fp32", "--eval-every", "0",
         "--eval-batches", "2", "--save-every", "0", "--log-every", "1", "--warmup-steps", "2"]
MAX_TIME_S = 4


def recipe_text(stem: str) -> str:
    return (CONFIGS / f"{stem}.yaml").read_text()


def comment_command(stem: str, label: str) -> list[str]:
    """The shell command in a `# Label:` comment of the YAML (with backslash continuations)."""
    lines = recipe_text(stem).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# {label}:"))
    parts = [lines[start].split(":", 1)[1]]
    while parts[-1].rstrip().endswith("\\"):
        parts[-1] = parts[-1].rstrip()[:-1]
        start += 1
        parts.append(lines[start].lstrip("#"))
    return shlex.split(" ".join(parts))


def same(a, b) -> bool:
    return a == pytest.approx(b) if isinstance(b, float) else a == b


def option(argv: list[str], name: str):
    return argv[argv.index(name) + 1] if name in argv else None


# ---- the configs say what the published recipes say (no training) ------------------------------

def test_every_recipe_has_a_config():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(RECIPES)


@pytest.mark.parametrize("stem", sorted(RECIPES))
def test_recipe_config_matches_the_published_recipe(stem):
    import models
    from trainer.train.batching import plan_batches

    want = RECIPES[stem]
    cfg = resolve(str(CONFIGS / f"{stem}.yaml"), {})
    for key, value in want["train"].items():
        assert same(getattr(cfg, key), value), key
    arch = models.get_config(cfg.model, **cfg.model_overrides)
    for key, value in want["arch"].items():
        assert getattr(arch, key) == value, key
    # The data command: the right hub dataset and tokenizer.
    data = comment_command(stem, "Data")
    assert data[:2] == ["python", "tools/convert_shards.py"]
    name, _, rest = option(data, "--source").removeprefix("hf:").partition(":")
    assert (name, rest.split("@")[0] or None) == want["source"]
    assert option(data, "--tokenizer") == want["tokenizer"] and option(data, "--out") == cfg.data
    # The global batch splits evenly over the GPU count the launch line uses.
    launch = comment_command(stem, "Launch")
    assert launch[-2:] == ["--config", f"configs/{stem}.yaml"]
    gpus = int(option(launch, "--num_gpus"))
    plan = plan_batches(cfg, arch.block_size, gpus)  # raises when it does not divide
    assert plan.tokens_per_step == (cfg.global_batch_tokens or cfg.global_batch * plan.seq_len)


def test_medium_recipe_micro_batch_is_what_estimate_memory_recommends():
    from trainer import memory
    from trainer.engine import ds_config

    cfg = resolve(str(CONFIGS / "gpt2-medium-fineweb-edu-2x24gb.yaml"), {})
    est = memory.estimate(cfg.model, ds_config.load_ds_config(cfg.ds_config), gpus=2, micro_batch=cfg.micro_batch,
                          seq_len=cfg.seq_len, activation_checkpointing=True, gpu_memory_gb=24)
    assert est.fits
    # The project's rule (memory.recommend): the largest power of two that fits, at most 32.
    assert cfg.micro_batch == min(32, 1 << int(math.log2(est.max_micro_batch)))
    assert parse_duration(cfg.max_time) == 24 * 3600
    # The LR schedule must end within the budget at a plausible 25k tokens/s per RTX 4090 (GPT-2 Medium with
    # recompute), not ~15x after it, or the time limit stops the run before the learning rate ever decays.
    assert cfg.max_steps * cfg.global_batch * cfg.seq_len <= 86_400 * 2 * 25_000


def test_readme_documents_every_recipe():
    readme = (REPO / "README.md").read_text()
    assert "## Recipes" in readme
    section = readme.split("## Recipes", 1)[1]
    for stem, want in RECIPES.items():
        assert f"configs/{stem}.yaml" in section, stem
        if want["result"]:
            assert want["result"] in section, (stem, want["result"])
    for hardware in ("RTX 4090", "A100"):
        assert hardware in section


# ---- end to end: one process runs every job ------------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """~40k byte tokens: an epoch is a handful of steps."""
    from pydoc_data.topics import topics

    from trainer.data.convert import convert

    root = tmp_path_factory.mktemp("small")
    docs, size = [], 0
    for key in sorted(topics):  # whole documents: validation takes whole documents
        docs.append(json.dumps({"text": topics[key]}))
        size += len(topics[key])
        if size > 40_000:
            break
    (root / "docs.jsonl").write_text("\n".join(docs) + "\n")
    convert(str(root / "docs.jsonl"), "bytes", root / "data", shard_tokens=20_000, val_tokens=4_000, workers=1,
            progress=False)
    return root / "data"


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """Every end-to-end job of this file, in one subprocess; returns (results, root)."""
    root = tmp_path_factory.mktemp("recipes")
    jobs = []
    for stem in RECIPES:
        data = comment_command(stem, "Data")[2:]  # after `python tools/convert_shards.py`
        data[data.index("--out") + 1] = str(root / "data" / stem)
        if "--workers" in data:
            data[data.index("--workers") + 1] = "1"
        data += ["--shard-tokens", "50000", "--val-tokens", "4000"]
        yaml_batch = resolve(str(CONFIGS / f"{stem}.yaml"), {})
        batch = ["--global-batch-tokens", "256"] if yaml_batch.global_batch_tokens else ["--global-batch", "4"]
        # fp32 for CPUs without bf16; a Muon recipe keeps Muon (and its required --grad-clip 0, from the YAML)
        ds = "zero2_muon_fp32" if uses_muon(load_ds_config(yaml_batch.ds_config)) else "zero2_fp32"
        args = ["--config", f"configs/{stem}.yaml", *TINY_SIZE, *TINY_RUN, "--ds-config", ds, *batch,
                "--data", str(root / "data" / stem), "--out", str(root / "runs" / stem)]
        if yaml_batch.hellaswag_every:
            args += ["--hellaswag-every", "2", "--hellaswag-jsonl", str(HELLASWAG)]
        jobs.append({"name": stem, "convert": data, "pretrain": args})
    jobs.append({"name": "epochs", "pretrain": [
        *SMALL, "--data", str(small_data), "--out", str(root / "runs" / "epochs"), "--epochs", "1.5",
        "--micro-batch", "8", "--global-batch", "32"]})
    jobs.append({"name": "max-time", "pretrain": [
        *SMALL, "--data", str(small_data), "--out", str(root / "runs" / "max-time"), "--max-time", f"{MAX_TIME_S}s",
        "--max-steps", "100000", "--micro-batch", "2", "--log-every", "10"]})
    jobs.append({"name": "no-tracking", "pretrain": [
        *SMALL, "--data", str(small_data), "--out", str(root / "runs" / "no-tracking"), "--max-steps", "2",
        "--micro-batch", "2", "--no-tracking", "--wandb-project", "recipes-test"]})
    if _wandb_installed():
        jobs.append({"name": "wandb", "pretrain": [
            *SMALL, "--data", str(small_data), "--out", str(root / "runs" / "wandb"), "--max-steps", "2",
            "--micro-batch", "2", "--eval-every", "2", "--wandb-project", "recipes-test"]})
    return drive(jobs, root), root


def job(runs, name: str) -> dict:
    results, _ = runs
    entry = results[name]
    assert "error" not in entry, entry["error"]
    return entry


@pytest.mark.extended
@pytest.mark.parametrize("stem", sorted(RECIPES))
def test_recipe_runs_end_to_end_at_tiny_size(runs, stem):
    import models
    from trainer import checkpoint

    entry = job(runs, stem)
    want = RECIPES[stem]
    # The data command asked the hub for the recipe's dataset, streaming.
    name, config = want["source"]
    assert entry["hub"] == [[name, config, "train", True]]
    # The run kept the recipe's settings apart from the tiny-size overrides.
    cfg, result = entry["config"], entry["result"]
    for key, value in want["train"].items():
        if key not in ("seq_len", "global_batch", "global_batch_tokens", "max_steps", "ds_config"):
            assert same(cfg[key], value), key
    run_dir = Path(result["run_dir"])
    arch = models.ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    for key, value in want["arch"].items():
        if key not in ("n_layer", "n_embd"):
            assert getattr(arch, key) == value, key
    assert (arch.n_layer, arch.n_embd, arch.vocab_size, arch.padded_vocab_size) == (2, 128, 50257, 50304)
    # 3 steps, finite falling-or-not losses, a val loss, a complete final checkpoint.
    assert result["step"] == 3 and result["stopped"] == "finished"
    losses = [r["loss"] for r in metrics(run_dir) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(50257), abs=1.0)  # a fresh model guesses uniformly
    assert math.isfinite(result["val_loss"])
    assert checkpoint.is_complete(run_dir / "checkpoints" / checkpoint.tag_for(3))


@pytest.mark.extended
def test_periodic_hellaswag_is_logged_like_val_loss(runs):
    from trainer.data.tokenizer import get_tokenizer
    from trainer.eval import evaluate, modelio

    entry = job(runs, "gpt2-fineweb-edu-10b")
    logged = [r for r in metrics(entry["result"]["run_dir"]) if "hellaswag_acc" in r]
    assert [r["step"] for r in logged] == [2, 3]  # every 2 steps, and the last step
    assert all(r["hellaswag_n"] == 5 and 0 <= r["hellaswag_acc_norm"] <= 1 for r in logged)
    # The final record equals scoring the saved model with eval-hellaswag's function.
    model, spec, _ = modelio.load_model(entry["result"]["run_dir"])
    again = evaluate.hellaswag(model, get_tokenizer(spec), evaluate.read_hellaswag(HELLASWAG), "cpu")
    assert (logged[-1]["hellaswag_acc"], logged[-1]["hellaswag_acc_norm"]) == (again["acc"], again["acc_norm"])


@pytest.mark.extended
def test_epochs_resolve_to_steps_from_the_token_count(runs, small_data):
    entry = job(runs, "epochs")
    meta = json.loads((small_data / "meta.json").read_text())
    # Windows of 65 tokens never cross a shard: (tokens - 1) // 64 per train shard.
    windows = sum((s["tokens"] - 1) // 64 for s in meta["shards"] if s["split"] == "train")
    steps = math.ceil(1.5 * windows / 32)
    assert entry["result"]["step"] == steps and entry["result"]["stopped"] == "finished"
    assert entry["result"]["tokens"] == steps * 32 * 64 >= 1.5 * windows * 64
    assert [r["step"] for r in metrics(entry["result"]["run_dir"]) if "loss" in r] == list(range(1, steps + 1))


@pytest.mark.extended
def test_max_time_saves_and_stops_before_the_run_ends(runs):
    from trainer import checkpoint

    entry = job(runs, "max-time")
    result = entry["result"]
    assert result["stopped"] == "max-time reached"
    assert 0 < result["step"] < 100_000
    # The budget counts from the start of run(); the loop keeps room for its slowest step plus a save,
    # so it has saved and stopped by the time the budget ends.
    assert entry["seconds"] <= MAX_TIME_S + 0.5, entry["seconds"]
    run_dir = Path(result["run_dir"])
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == checkpoint.tag_for(result["step"]) and checkpoint.is_complete(run_dir / "checkpoints" / latest)


@pytest.mark.extended
def test_no_tracking_turns_off_tensorboard_and_wandb(runs):
    run_dir = Path(job(runs, "no-tracking")["result"]["run_dir"])
    assert not (run_dir / "tb").exists() and not (run_dir / "wandb").exists()
    assert [r["step"] for r in metrics(run_dir)] == [1, 2]  # metrics.jsonl stays: plot and resume read it


@pytest.mark.extended
def test_wandb_offline_logs_beside_tensorboard(runs):
    if not _wandb_installed():
        pytest.skip("wandb is not installed (pip install -e .[wandb])")
    run_dir = Path(job(runs, "wandb")["result"]["run_dir"])
    assert any((run_dir / "tb").iterdir())
    offline = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline) == 1
    history = offline[0].read_bytes()
    for key in (b"loss", b"val_loss", b"tokens_per_s", b"grad_norm"):
        assert key in history, key


@pytest.mark.slow
def test_two_gpu_recipe_as_published_on_two_ranks(small_data, tmp_path):
    """The 2 x 24 GB recipe with its own launch line and DeepSpeed config (2 ranks, ZeRO-2 bf16,
    activation checkpointing), tiny size: bf16 is slow on CPUs without native bf16, hence slow."""
    stem = "gpt2-medium-fineweb-edu-2x24gb"
    launch = comment_command(stem, "Launch")
    gpus = int(option(launch, "--num_gpus"))
    out = tmp_path / "run"
    run_cli(["pretrain", "--config", f"configs/{stem}.yaml", *TINY_SIZE, "--seq-len", "64", "--micro-batch", "2",
             "--global-batch", "8", "--max-steps", "3", "--log-every", "1", "--eval-every", "3", "--eval-batches", "2",
             "--data", str(small_data), "--out", str(out)], ranks=gpus)
    losses = [r["loss"] for r in metrics(out) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    config = (out / "config.yaml").read_text()
    assert "ds_config: zero2_bf16" in config and "activation_checkpointing: true" in config
    assert "grad_accum: 2" in config  # 8 = 2 ranks x 2 x 2
