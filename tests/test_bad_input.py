"""Bad input everywhere: one `Error: ...` line saying what and how to fix, non-zero exit, no traceback,
nothing written or overwritten.

`pretrain` cases run in-process through Click's CliRunner: every one of them must fail before the
DeepSpeed engine exists, so `deepspeed.initialize` is replaced by a trap (reaching it is a test
failure) and torch.distributed is never started in the test process. A few cases that only fail
later (a checkpoint of another model, an --out that is a file) and the standalone tools run as
real subprocesses.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import cli_command

from trainer.cli import cli

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "tiny", "--seq-len", "64", "--micro-batch", "4", "--max-steps", "2", "--ds-config", "zero2_fp32",
        "--eval-every", "0", "--no-tracking"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from trainer.data.convert import convert

    out = tmp_path_factory.mktemp("data") / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    return out


def _corrupt(dataset: Path, where: Path, how: str) -> Path:
    copy = where / f"data-{how}"
    shutil.copytree(dataset, copy)
    shard = copy / "train_000001.bin"
    raw = bytearray(shard.read_bytes())
    if how == "magic":
        raw[0:4] = np.int32(1234).tobytes()
    elif how == "version":
        raw[4:8] = np.int32(7).tobytes()
    elif how == "truncated":
        raw = raw[:-100]
    elif how == "ids":
        raw[1024 + 10:1024 + 12] = np.uint16(400).tobytes()  # vocab is 257
    elif how == "meta":
        meta = json.loads((copy / "meta.json").read_text())
        next(s for s in meta["shards"] if s["name"] == shard.name)["tokens"] += 5
        (copy / "meta.json").write_text(json.dumps(meta))
    shard.write_bytes(bytes(raw))
    return copy


def _files(where: Path) -> dict:
    return {p: p.read_bytes() for p in where.rglob("*") if p.is_file()}


def _ds_json(where: Path, text: str) -> str:
    path = where / "ds.json"
    path.write_text(text)
    return str(path)


def _yaml(where: Path, text: str) -> str:
    path = where / "run.yaml"
    path.write_text(text)
    return str(path)


def _model_of_other_shape(where: Path) -> str:
    import models

    models.save(models.GPT(models.get_config("tiny", n_layer=3, vocab_size=257, padded_vocab_size=320)), where / "m")
    return str(where / "m")


NO_DATA = "(no --data: the demo data path)"
# (id, args builder (tmp, data) -> args, expected fragment of the error line)
PRETRAIN = [
    ("wrong-type-int", lambda t, d: ["--max-steps", "four"], "'four' is not a valid integer"),
    ("micro-batch-neither-int-nor-auto", lambda t, d: ["--micro-batch", "four"], "'four' is not an integer or auto"),
    ("wrong-type-float", lambda t, d: ["--lr", "fast"], "'fast' is not a valid float"),
    ("bad-choice", lambda t, d: ["--schedule", "exponential"], "'exponential' is not one of"),
    ("unknown-option", lambda t, d: ["--learning-rate", "1"], "No such option '--learning-rate'"),
    ("unknown-preset", lambda t, d: ["--model", "gpt3"], "gpt3"),
    ("set-without-equals", lambda t, d: ["--set", "n_layer"], "--set expects KEY=VALUE"),
    ("set-unknown-field", lambda t, d: ["--set", "n_layers=3"], "n_layers"),
    ("missing-data-dir", lambda t, d: ["--data", str(t / "nope")], "does not exist"),
    ("tokenizer-with-data", lambda t, d: ["--tokenizer", "gpt2"], "--tokenizer is only for the built-in demo data"),
    ("unknown-tokenizer-spec", lambda t, d: [NO_DATA, "--tokenizer", "gpt5"], "gpt5"),
    ("batch-not-divisible", lambda t, d: ["--global-batch", "10"], "not divisible by ranks x micro-batch"),
    ("accum-contradicts-batch", lambda t, d: ["--global-batch", "8", "--grad-accum", "3"], "contradicts"),
    ("tokens-not-multiple", lambda t, d: ["--global-batch-tokens", "1000"], "not a multiple of --seq-len"),
    ("seq-longer-than-block", lambda t, d: ["--seq-len", "128"], "longer than the model's block_size"),
    ("zero-steps", lambda t, d: ["--max-steps", "0"], "max-steps must be a positive integer"),
    ("negative-epochs", lambda t, d: ["--epochs", "-1"], "epochs must be positive"),
    ("nan-epochs", lambda t, d: ["--epochs", "nan"], "epochs must be a finite number"),  # found by the fuzzer
    ("nan-lr", lambda t, d: ["--lr", "nan"], "lr must be a finite number"),
    ("inf-grad-clip", lambda t, d: ["--grad-clip", "inf"], "grad-clip must be a finite number"),
    ("yaml-string-lr", lambda t, d: ["--config", _yaml(t, "lr: fast\n")], "lr must be a finite number"),
    ("negative-rollbacks", lambda t, d: ["--max-rollbacks", "-1"], "-1 is not in the range x>=0"),
    ("min-lr-above-lr", lambda t, d: ["--lr", "1e-4", "--min-lr", "1e-3"], "min-lr <= lr"),
    ("bad-duration", lambda t, d: ["--max-time", "a while"], "cannot read duration"),
    ("missing-resume-path", lambda t, d: ["--resume", str(t / "ckpt")], "no such checkpoint"),
    ("unknown-ds-config", lambda t, d: ["--ds-config", "zero9_bf16"], "not found; pass a JSON file path or one of"),
    ("malformed-ds-json", lambda t, d: ["--ds-config", _ds_json(t, '{"zero_optimization": {"stage": 2,}}')],
     "is not valid JSON"),
    ("ds-json-not-object", lambda t, d: ["--ds-config", _ds_json(t, "[1, 2]")], "must hold a JSON object"),
    ("ds-json-scheduler", lambda t, d: ["--ds-config", _ds_json(t, '{"scheduler": {"type": "WarmupLR"}}')],
     "has a 'scheduler' block"),
    ("ds-json-contradicts", lambda t, d: ["--ds-config", _ds_json(t, '{"train_micro_batch_size_per_gpu": 16}')],
     "train_micro_batch_size_per_gpu=16 but the trainer computed 4"),
    ("missing-yaml", lambda t, d: ["--config", str(t / "none.yaml")], "does not exist"),
    ("malformed-yaml", lambda t, d: ["--config", _yaml(t, "lr: [1, 2\n")], "not valid YAML"),
    ("yaml-not-mapping", lambda t, d: ["--config", _yaml(t, "- lr\n- 1\n")], "must be a mapping"),
    ("yaml-unknown-key", lambda t, d: ["--config", _yaml(t, "learning_rate: 1\n")], "valid keys"),
    ("yaml-wrong-type", lambda t, d: ["--config", _yaml(t, "log_every: often\n")],
     "log-every must be a positive integer"),
    ("init-from-missing", lambda t, d: ["--init-from", str(t / "no-model")], "no-model"),
    ("init-from-other-model", lambda t, d: ["--init-from", _model_of_other_shape(t)], "architecture differs"),
    ("hellaswag-without-file", lambda t, d: ["--hellaswag-every", "5"], "needs --hellaswag-jsonl"),
    # corrupt shards: refused at startup, the file named
    ("shard-bad-magic", lambda t, d: ["--data", str(_corrupt(d, t, "magic"))], "train_000001.bin has magic 1234"),
    ("shard-bad-version", lambda t, d: ["--data", str(_corrupt(d, t, "version"))], "train_000001.bin has version 7"),
    ("shard-truncated", lambda t, d: ["--data", str(_corrupt(d, t, "truncated"))],
     "train_000001.bin is 4"),
    ("shard-id-out-of-vocab", lambda t, d: ["--data", str(_corrupt(d, t, "ids"))],
     "train_000001.bin holds token id 400 >= vocab size 257"),
    ("shard-meta-mismatch", lambda t, d: ["--data", str(_corrupt(d, t, "meta"))],
     "train_000001.bin: meta.json records"),
]


def assert_one_line_error(result, fragment: str):
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"  # no traceback
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("case, build, fragment", PRETRAIN, ids=[c[0] for c in PRETRAIN])
def test_pretrain_bad_input(case, build, fragment, dataset, no_engine, tmp_path):
    args = build(tmp_path, dataset)
    if NO_DATA in args:
        args.remove(NO_DATA)
    elif "--data" not in args:
        args = ["--data", str(dataset), *args]
    before = _files(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["pretrain", *TINY, "--out", str(out), *args])
    assert_one_line_error(result, fragment)
    assert not out.exists(), "a failed start wrote into --out"
    assert _files(tmp_path) == before, "a failed start changed a file"
    assert not any(no_engine.iterdir()), "a failed start wrote into the working directory"


def test_bad_input_does_not_touch_an_existing_run(dataset, no_engine, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("lr: 0.001\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    before = _files(run_dir)
    result = CliRunner().invoke(cli, ["pretrain", *TINY, "--data", str(dataset), "--out", str(run_dir),
                                      "--global-batch", "10"])
    assert_one_line_error(result, "not divisible")
    assert _files(run_dir) == before


OTHER_COMMANDS = [
    ("eval-ppl-missing-model", lambda t: ["eval-ppl", "--model-path", str(t / "nothing"), "--text-file", __file__],
     "nothing"),
    ("eval-ppl-missing-text", lambda t: ["eval-ppl", "--model-path", _model_of_other_shape(t), "--tokenizer", "bytes",
                                         "--text-file", str(t / "none.txt")], "none.txt"),
    ("generate-missing-model", lambda t: ["generate", "--model-path", str(t / "nothing")], "nothing"),
    ("generate-wrong-type", lambda t: ["generate", "--model-path", "x", "--max-new-tokens", "lots"],
     "'lots' is not a valid integer"),
    ("hellaswag-missing-jsonl", lambda t: ["eval-hellaswag", "--model-path", _model_of_other_shape(t), "--jsonl",
                                           str(t / "hs.jsonl")], "hs.jsonl"),
    ("estimate-memory-unknown-preset", lambda t: ["estimate-memory", "--model", "gpt9"], "gpt9"),
    ("estimate-memory-unknown-ds", lambda t: ["estimate-memory", "--ds-config", "zero7"], "zero7"),
    ("plot-missing-run", lambda t: ["plot", str(t / "norun")], "does not exist"),
    ("unknown-command", lambda t: ["pretrian"], "No such command 'pretrian'"),
]


@pytest.mark.parametrize("case, build, fragment", OTHER_COMMANDS, ids=[c[0] for c in OTHER_COMMANDS])
def test_other_commands_bad_input(case, build, fragment, tmp_path, monkeypatch):
    args = build(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = _files(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, fragment)
    assert _files(tmp_path) == before


# ---- real processes: failures that only show once DeepSpeed runs, and the standalone tools ------------------

def _run(cmd, tmp_path):
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}, **env}
    return subprocess.run([sys.executable, *cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def assert_one_line_error_proc(proc, fragment):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]


@pytest.mark.slow
def test_resume_from_a_checkpoint_of_another_model(dataset, tmp_path):
    base = ["-m", "trainer.cli", "pretrain", *TINY, "--data", str(dataset)]
    first = _run([*base, "--out", str(tmp_path / "a")], tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _files(tmp_path / "a")
    proc = _run([*base, "--out", str(tmp_path / "b"), "--set", "n_embd=128", "--resume", str(tmp_path / "a")],
                tmp_path)
    assert_one_line_error_proc(proc, "n_embd")
    assert _files(tmp_path / "a") == before


def test_tools_bad_input(tmp_path):
    proc = _run([str(REPO / "tools" / "zero_to_fp32.py"), str(tmp_path / "no-run"), str(tmp_path / "out")], tmp_path)
    assert_one_line_error_proc(proc, "no-run")
    assert not (tmp_path / "out").exists()
    proc = _run([str(REPO / "tools" / "convert_shards.py"), "--source", "pydoc", "--tokenizer", "gpt5", "--out",
                 str(tmp_path / "o")], tmp_path)
    assert_one_line_error_proc(proc, "gpt5")
    assert not (tmp_path / "o").exists()


def test_a_failure_inside_deepspeeds_initialisation_is_one_line_said_once(dataset, tmp_path):
    """Two ranks, a config that asks for DeepSpeed's FusedAdam, and no C++ compiler to build it: one `Error:`
    line naming the op, what is missing and the fixes, once for the launch, no traceback from either rank."""
    from helpers import launch_env

    env = launch_env(CXX=str(tmp_path / "no-such-compiler"), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    cmd = cli_command(["pretrain", *TINY, "--data", str(dataset), "--out", str(tmp_path / "run"), "--ds-config",
                       "zero2_fusedadam_bf16", "--global-batch", "8"], ranks=2)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert_one_line_error_proc(proc, "could not build its fused_adam op")
    error = next(line for line in proc.stderr.splitlines() if line.startswith("Error"))
    assert "no C++ compiler" in error and "build-essential" in error and '"torch_adam": true' in error


def test_an_engine_failure_outside_the_op_build_is_not_blamed_on_the_op(tmp_path, monkeypatch):
    """FusedAdam's op is not built here, but the error came from elsewhere (a GPU out of memory while the model
    moves there): it is said as what it is, by the rank that met it, not as a failed build."""
    from trainer.engine.build import initialize_error
    from trainer.engine.ds_config import load_ds_config

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    try:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    except RuntimeError as e:
        error = initialize_error(e, load_ds_config("zero2_fusedadam_bf16"))
    assert error.every_rank is False and "out of memory" in error.message
    assert "could not build its" not in error.message and error.message.startswith("rank 0: ")


def test_only_errors_every_rank_meets_alike_are_left_to_local_rank_0(monkeypatch):
    """A set-up mistake (every rank meets it) is printed by local rank 0 only; an error that may be one rank's
    alone (its GPU) is printed by whichever rank meets it, so a launch never fails without a word."""
    import io

    from trainer.errors import UserError

    monkeypatch.setenv("LOCAL_RANK", "1")
    for every_rank, printed in ((True, False), (False, True), (None, True)):
        out = io.StringIO()
        UserError("what went wrong", every_rank=every_rank).show(out)
        assert ("what went wrong" in out.getvalue()) is printed, every_rank
