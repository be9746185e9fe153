"""doctor: runs on this CPU-only machine, reports each finding with a fix, fails on a full disk."""
import importlib.metadata
import json
from collections import namedtuple

import torch
from click.testing import CliRunner

from trainer import doctor
from trainer.cli import cli


def _run(*args):
    result = CliRunner().invoke(cli, ["doctor", *args])
    return result, json.loads(result.output.strip().splitlines()[-1]) if "--json" in args else None


def test_doctor_on_this_machine(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")  # plenty of disk, whatever this machine has left
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10**13, 10**12, 9 * 10**12))
    result, report = _run("--json", "--out", str(tmp_path), "--model", "tiny")
    assert result.exit_code == 0, result.output
    checks = {c["name"]: c for c in report["checks"]}
    assert {"python", "torch", "deepspeed", "gpus", "bf16", "op fused_adam", "op cpu_adam", "disk"} <= set(checks)
    installed = importlib.metadata.version("deepspeed")  # what pip installed, read without importing it
    assert checks["deepspeed"]["status"] == "ok" and installed in checks["deepspeed"]["detail"]
    if not torch.cuda.is_available():
        assert checks["gpus"]["status"] == "warn" and checks["gpus"]["fix"]
    for c in report["checks"]:
        assert c["status"] in ("ok", "warn", "fail")
        assert c["status"] == "ok" or c["fix"], c          # every problem comes with its fix
    assert checks["op fused_adam"]["status"] in ("ok", "warn")
    assert report["ok"] and report["fails"] == 0


def test_doctor_text_output(tmp_path):
    result, _ = _run("--out", str(tmp_path / "not" / "yet"), "--model", "tiny")
    assert result.exit_code == 0, result.output
    assert "deepspeed" in result.output and "problem(s)" in result.output


def test_full_disk_fails_with_a_fix(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda path: usage(10**9, 10**9, 10**6))
    check = doctor._disk(str(tmp_path), "gpt2-medium", 3)
    assert check.status == "fail" and "keep-last" in check.fix
    assert "4.63 GB each" in check.detail                  # 14 bytes/param: bf16 weights + fp32 master + Adam


def test_doctor_bad_model_is_one_line_error(tmp_path):
    result, _ = _run("--out", str(tmp_path), "--model", "gpt9")
    assert result.exit_code != 0 and "unknown model preset" in result.output and "Traceback" not in result.output
