"""A checkpoint from elsewhere must not run code: a crafted pickle in any of its files is refused by every
command that reads checkpoints, in one line naming the file and what it asked for, and nothing runs.

The crafted object's `__reduce__` calls os.system to create a marker file: the marker must never appear
(unless the user passes --trust-checkpoints, which says what it risks). Every checkpoint kind the trainer
writes still loads through the safe loader (the other suites resume, export and evaluate them through it).
"""
import os
import shutil
import subprocess

import pytest
import torch
from helpers import REPO, TINY_ARGS, cli_command, launch_env, run_cli

FILES = {"model": "mp_rank_00_model_states.pt", "optimizer": "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
         "rng": "rng/rank_0.pt"}


class RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """A real 2-step run (ZeRO-2 bf16, one rank) whose checkpoint the tests copy and tamper with."""
    out = tmp_path_factory.mktemp("safe") / "run"
    run_cli(["pretrain", *TINY_ARGS, "--data", str(data), "--out", str(out), "--max-steps", "2", "--save-every", "2",
             "--no-tracking", "--ds-config", "zero2_bf16"])
    return out


def crafted(run, tmp_path, which: str = "model"):
    """A copy of the run whose checkpoint file `which` also carries a RunsAShellCommand; returns (run, marker)."""
    evil, marker = tmp_path / "evil", tmp_path / "PWNED"
    shutil.copytree(run, evil)
    path = evil / "checkpoints" / "step_0000002" / FILES[which]
    state = torch.load(path, weights_only=False)
    state["extra"] = RunsAShellCommand(f"touch {marker}")
    torch.save(state, path)  # same name, sound zip: the COMPLETE marker's file list still holds
    return evil, marker


def assert_refused(proc, marker, file):
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-3000:]
    assert "refused to load" in errors[0] and "posix.system" in errors[0] and file in errors[0], errors[0]
    assert "Traceback" not in proc.stderr and not marker.exists()


def _run(args):
    return subprocess.run(cli_command(args), cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", ["eval-ppl", "generate", "zero_to_fp32", "init-from"])
def test_a_crafted_model_states_file_is_refused_by_every_command(run, data, tmp_path, no_engine, command):
    """In process (the refusal comes before any engine; `no_engine` fails the test if one is reached)."""
    from click.testing import CliRunner

    from tools.zero_to_fp32 import main as zero_to_fp32
    from trainer.cli import cli

    evil, marker = crafted(run, tmp_path)
    args = {"eval-ppl": ["eval-ppl", "--model-path", evil, "--max-tokens", "200", "--no-progress"],
            "generate": ["generate", "--model-path", evil, "--max-new-tokens", "4"],
            "zero_to_fp32": [evil, tmp_path / "out"],
            "init-from": ["pretrain", *TINY_ARGS, "--data", data, "--out", tmp_path / "new", "--init-from", evil,
                          "--max-steps", "1"]}[command]
    result = CliRunner().invoke(zero_to_fp32 if command == "zero_to_fp32" else cli, [str(a) for a in args])
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert result.exit_code == 1 and len(errors) == 1, result.output[-3000:]
    assert "refused to load" in errors[0] and "posix.system" in errors[0] and FILES["model"] in errors[0]
    assert not marker.exists()


@pytest.mark.parametrize("which", ["model", "optimizer", "rng"])
def test_a_crafted_checkpoint_file_is_refused_on_resume(run, data, tmp_path, which):
    """A real resume launch: files only DeepSpeed's engine (or the RNG restore) reads are checked before it reads
    them."""
    evil, marker = crafted(run, tmp_path, which)
    proc = _run(["pretrain", *TINY_ARGS, "--data", data, "--out", evil, "--max-steps", "3"])
    assert_refused(proc, marker, FILES[which].split("/")[-1])


def test_trust_checkpoints_is_an_explicit_opt_in_that_runs_the_file(run, tmp_path):
    evil, marker = crafted(run, tmp_path)
    proc = _run(["--trust-checkpoints", "eval-ppl", "--model-path", evil, "--max-tokens", "200", "--no-progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.exists()  # what the flag's help warns about: full pickle runs the file's code


def test_every_file_of_the_trainers_own_checkpoints_passes_the_safe_loader(run):
    from trainer.checkpoint import safe_load

    files = sorted((run / "checkpoints" / "step_0000002").rglob("*.pt"))
    assert {f.name for f in files} >= {FILES["model"], FILES["optimizer"], "rank_0.pt"}
    for path in files:
        safe_load.load(path, map_location="cpu")


def test_a_crafted_file_behind_a_symlinked_folder_is_found(run, tmp_path):
    """DeepSpeed's universal loader reads step_N/universal/; a folder linked there from elsewhere is checked too."""
    from trainer.checkpoint import safe_load
    from trainer.errors import UserError

    evil, marker = tmp_path / "evil", tmp_path / "PWNED"
    shutil.copytree(run, evil)
    elsewhere = tmp_path / "elsewhere" / "zero" / "transformer.wte.weight"
    elsewhere.mkdir(parents=True)
    torch.save({"param": RunsAShellCommand(f"touch {marker}")}, elsewhere / "fp32.pt")
    (evil / "checkpoints" / "step_0000002" / "universal").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(UserError, match="posix.system"):
        safe_load.check_checkpoint(evil / "checkpoints" / "step_0000002")
    assert not marker.exists()
