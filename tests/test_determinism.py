"""--deterministic: recorded in the run and checked on resume; a 2-rank ZeRO-2 run paused and resumed under it
equals the uninterrupted one bitwise; an op with no deterministic implementation is one clear error.

(On a GPU the same runs are what bench/gpu_report.py compares: two uninterrupted runs and a resumed one.)
"""
import pytest
import yaml
from click.testing import CliRunner
from helpers import TINY_ARGS, curve, run_cli

from trainer.cli import cli

ARGS = [*TINY_ARGS, "--global-batch", "8", "--save-every", "3", "--keep-last", "0", "--no-tracking",
        "--ds-config", "zero2_bf16"]


def test_the_option_is_recorded_and_a_resume_without_it_says_so(data, tmp_path):
    run = tmp_path / "run"
    run_cli(["pretrain", *ARGS, "--data", str(data), "--out", str(run), "--max-steps", "3", "--deterministic"])
    assert yaml.safe_load((run / "config.yaml").read_text())["deterministic"] is True
    proc = run_cli(["pretrain", *ARGS, "--data", str(data), "--out", str(run), "--max-steps", "4"])
    assert "trained with --deterministic and resumes without it" in proc.stdout
    for command in ("pretrain", "finetune"):
        assert "--deterministic" in CliRunner().invoke(cli, [command, "--help"]).output


@pytest.mark.extended
def test_a_two_rank_zero2_run_paused_and_resumed_under_it_is_bitwise(data, tmp_path):
    ref, paused = tmp_path / "ref", tmp_path / "paused"
    common = [*ARGS, "--data", str(data), "--max-steps", "6", "--deterministic"]
    run_cli(["pretrain", *common, "--out", str(ref)], ranks=2)
    run_cli(["pretrain", *common, "--out", str(paused), "--stop-after-steps", "3"], ranks=2)
    run_cli(["pretrain", *common, "--out", str(paused)], ranks=2)
    for key in ("loss", "lr", "grad_norm"):
        assert curve(paused, key) == curve(ref, key), key  # bitwise: == on floats


NOT_DETERMINISTIC = '''
import sys
import torch
import models
from trainer.cli import cli

forward = models.GPT.forward
unpool = torch.nn.MaxUnpool1d(2)


def with_an_unpool(self, idx, *args, **kwargs):  # an op torch has no deterministic kernel for, even on a CPU
    values, indices = torch.nn.functional.max_pool1d(idx[:, None].float(), 2, return_indices=True)
    unpool(values, indices)
    return forward(self, idx, *args, **kwargs)


models.GPT.forward = with_an_unpool
cli.main(["pretrain", *sys.argv[1:]])
'''


def test_an_op_without_a_deterministic_kernel_is_one_clear_error(data, tmp_path):
    script = tmp_path / "unpool.py"
    script.write_text(NOT_DETERMINISTIC)
    args = [*ARGS, "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2"]
    proc = run_cli([*args, "--deterministic"], script=script, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "--deterministic: max_unpooling" in errors[0] and "run without --deterministic" in errors[0]
    assert run_cli(args, script=script).returncode == 0  # the same op is fine without the option
