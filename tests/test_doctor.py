"""doctor: runs on this CPU-only machine, reports each finding with a fix, fails on a full disk."""
import importlib.metadata
import json
import os
from collections import namedtuple

import torch
from click.testing import CliRunner

from trainer.cli import cli
from trainer.engine import doctor


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


def test_doctor_says_which_optimizer_runs_and_that_it_builds_nothing(tmp_path):
    result, report = _run("--json", "--out", str(tmp_path), "--model", "tiny")
    checks = {c["name"]: c for c in report["checks"]}
    assert "torch.optim.AdamW" in checks["optimizer"]["detail"] and "nothing to build" in checks["optimizer"]["detail"]
    listing = checks["ds_configs"]["detail"]
    assert "DeepSpeed CPUAdam: zero2_offload_bf16" in listing and "DeepSpeed FusedAdam: zero2_fusedadam_bf16" in listing
    assert "used by zero2_offload_bf16" in checks["op cpu_adam"]["detail"]


def test_a_shipped_config_given_by_its_relative_path_is_listed_once(tmp_path):
    from trainer.engine.ds_config import DS_CONFIG_DIR

    relative = os.path.relpath(DS_CONFIG_DIR / "zero2_offload_bf16.json")
    result, report = _run("--json", "--out", str(tmp_path), "--model", "tiny", "--ds-config", relative)
    checks = {c["name"]: c for c in report["checks"]}
    assert "DeepSpeed CPUAdam: zero2_offload_bf16" in checks["ds_configs"]["detail"].split("; ")
    assert checks["op cpu_adam"]["detail"].count("zero2_offload_bf16") == 1


def test_a_build_that_would_fail_is_a_problem_only_for_the_config_that_needs_it(tmp_path, monkeypatch):
    """No C++ compiler and nothing built yet: the default config (torch's AdamW) still passes; a config that
    needs DeepSpeed's FusedAdam fails, naming what is missing and the fix."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    result, report = _run("--json", "--out", str(tmp_path), "--model", "tiny")
    checks = {c["name"]: c for c in report["checks"]}
    fused = checks["op fused_adam"]
    assert result.exit_code == 0 and fused["status"] == "warn"
    assert "no C++ compiler" in fused["detail"] and "build-essential" in fused["fix"]
    result, report = _run("--json", "--out", str(tmp_path), "--model", "tiny", "--ds-config", "zero2_fusedadam_bf16")
    checks = {c["name"]: c for c in report["checks"]}
    assert result.exit_code == 1 and checks["op fused_adam"]["status"] == "fail"
    assert "DeepSpeed FusedAdam" in checks["optimizer"]["detail"]
    assert not (tmp_path / "extensions").exists()  # doctor looked, built nothing


def test_an_arch_list_entry_deepspeed_cannot_parse_is_found_with_deepspeeds_own_parser(monkeypatch):
    """TORCH_CUDA_ARCH_LIST=9.0a (Hopper's suffix, which torch accepts) breaks DeepSpeed's CUDA op builds."""
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder  # the CUDA builder, whatever this machine has

    from trainer.engine import build as engine

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    found, fix = engine.arch_list_problem(FusedAdamBuilder())
    assert "9.0a" in found and fix == "build with TORCH_CUDA_ARCH_LIST='8.0;9.0'"
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0a"  # left as the user set it
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    assert engine.arch_list_problem(FusedAdamBuilder()) is None


def test_peer_to_peer_verdicts_on_consumer_cards():
    def pair(peer, nvlink, copy):
        return {"pair": (0, 1), "peer_access": peer, "nvlink": nvlink, "copy": copy}

    assert doctor.is_consumer_card("NVIDIA GeForce RTX 4090") and not doctor.is_consumer_card("NVIDIA H100 80GB HBM3")
    hung = doctor.peer_to_peer_check([pair(True, False, "hung")])
    assert hung.status == "fail" and "NCCL_P2P_DISABLE=1" in hung.fix
    assert doctor.peer_to_peer_check([pair(True, False, "wrong")]).status == "fail"
    assert doctor.peer_to_peer_check([pair(False, False, None)]).status == "ok"
    assert doctor.peer_to_peer_check([pair(True, True, None)]).detail == "consumer GPUs, NVLink"
    passed = doctor.peer_to_peer_check([pair(True, False, "ok")])
    assert passed.status == "ok" and "NCCL_P2P_DISABLE=1" in passed.detail
