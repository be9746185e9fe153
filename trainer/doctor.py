"""Pre-flight check before a long run (`python -m trainer.cli doctor`).

Each check is ok / warn / fail with what was found and, when it is not ok, the fix. The Adam ops are
checked the cheap way by default (compatible? prebuilt or already JIT-built and loadable?): a first
JIT build takes ~100 s and a compiler, which `--build-ops` runs on purpose. A fail means the run
would crash; a warn means it would run, slower or on CPU. Exit status 1 when any check fails.
"""
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from trainer.errors import UserError

GB = 2 ** 30


@dataclass
class Check:
    name: str
    status: str          # ok | warn | fail
    detail: str
    fix: str = ""


def _versions() -> list[Check]:
    import torch

    checks = [Check("python", "ok", platform.python_version()),
              Check("torch", "ok", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})")]
    try:
        from trainer import engine

        v = engine.versions()
        checks.append(Check("deepspeed", "ok", f"{v['deepspeed']}, accelerator {v['accelerator']}"))
    except Exception as e:  # a broken DeepSpeed install is the most common finding of all
        checks.append(Check("deepspeed", "fail", f"import failed: {type(e).__name__}: {e}"[:300],
                            "pip install deepspeed (matching your torch build); see `ds_report`"))
    return checks


def _devices() -> list[Check]:
    import torch

    if not torch.cuda.is_available():
        hint = " (CUDA_VISIBLE_DEVICES is set to an empty list)" if os.environ.get("CUDA_VISIBLE_DEVICES") == "" else ""
        return [Check("gpus", "warn", f"no CUDA device visible{hint}: training runs on the CPU (fine for the demo "
                      f"and tests, far too slow for real pretraining)",
                      "on a GPU machine: install a CUDA build of torch (pip install torch --index-url "
                      "https://download.pytorch.org/whl/cu124) and check nvidia-smi")]
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    mem = [torch.cuda.get_device_properties(i).total_memory / GB for i in range(len(names))]
    detail = ", ".join(f"{n} ({m:.0f} GB)" for n, m in zip(names, mem))
    return [Check("gpus", "ok", f"{len(names)} visible: {detail}")]


def _bf16() -> Check:
    import torch


    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Check("bf16", "ok", "the GPU supports bf16: use the *_bf16 configs")
        return Check("bf16", "warn", "this GPU has no bf16 (pre-Ampere)",
                     "use ds_configs/zero2_fp16.json (loss scaling) instead of the bf16 configs")
    from trainer.ds_config import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return Check("bf16", "ok", "the CPU has native bf16 (AVX512-BF16/AMX)")
    return Check("bf16", "warn", "the CPU has no native bf16: bf16 matmuls are emulated (~100x slower than fp32)",
                 "on this machine use --ds-config auto (picks zero2_fp32) or ds_configs/zero2_fp32.json")


def _ops(build: bool) -> list[Check]:
    try:
        from trainer import engine

        status = engine.op_status(build=build)
    except Exception as e:
        return [Check("deepspeed ops", "fail", f"could not query op builders: {type(e).__name__}: {e}"[:300],
                      "reinstall deepspeed; run `ds_report` for details")]
    fixes = {"fused_adam": "used by every non-offload config (optimizer type AdamW)",
             "cpu_adam": "used by ds_configs/zero2_offload_bf16.json"}
    build_fix = ("needs a C++ compiler (and nvcc on GPU machines) and ninja: apt-get install build-essential, "
                 "pip install ninja; or prebuild with DS_BUILD_FUSED_ADAM=1 DS_BUILD_CPU_ADAM=1 pip install deepspeed")
    checks = []
    for name, info in status.items():
        use = fixes.get(name, "")
        if not info["compatible"]:
            found = f"not compatible with this system ({use}) {info['error'] or ''}".strip()
            checks.append(Check(f"op {name}", "fail", found, build_fix + "; `ds_report` shows what is missing"))
        elif info["loaded"] is False:
            checks.append(Check(f"op {name}", "fail", f"failed to build/load ({use}): {info['error']}", build_fix))
        elif info["loaded"]:
            how = "prebuilt" if info["prebuilt"] else "JIT build cached" if info["cached"] else "built now"
            checks.append(Check(f"op {name}", "ok", f"loads ({how})"))
        else:
            checks.append(Check(f"op {name}", "warn", f"compatible, not built yet ({use}): the first run JIT-builds it "
                                f"(~100 s, once; cached under ~/.cache/torch_extensions)",
                                "run `python -m trainer.cli doctor --build-ops` now to build it and see any "
                                "compiler error"))
    return checks


def checkpoint_bytes(n_params: int) -> int:
    """One DeepSpeed checkpoint: 16-bit weights (2 B/param) + fp32 master and Adam m, v (12 B/param)."""
    return 14 * n_params


def _disk(out: str, model: str, keep_last: int) -> Check:
    from trainer import memory

    path = Path(out)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    try:
        n_params = memory.param_stats(memory.model_config(model))["n_params"]
    except UserError as e:
        raise UserError(f"--model: {e.message}")
    need = checkpoint_bytes(n_params) * (keep_last + 1)  # keep_last complete ones + the one being written
    detail = (f"{free / GB:.1f} GB free at {probe}; {model} checkpoints are {checkpoint_bytes(n_params) / GB:.2f} GB "
              f"each, {keep_last} kept + 1 being written = {need / GB:.1f} GB")
    if free < need:
        return Check("disk", "fail", detail, "free space, point --out at a larger disk, or lower --keep-last")
    if free < 2 * need:
        return Check("disk", "warn", detail, "little headroom for data shards and logs; consider a larger disk")
    return Check("disk", "ok", detail)


def _launch_env() -> Check:
    import torch

    world = os.environ.get("WORLD_SIZE")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world and n and int(world) > n and "NODE_RANK" not in os.environ and "GROUP_RANK" not in os.environ:
        return Check("launch", "warn", f"WORLD_SIZE={world} but only {n} GPUs are visible here",
                     "launch with --num_gpus / --nproc_per_node equal to the visible GPUs (or set up multi-node)")
    return Check("launch", "ok", f"launch with: deepspeed --num_gpus {max(n, 1)} --module trainer.cli pretrain ..."
                 if n else "single process: python -m trainer.cli pretrain ...")


def checks(*, build_ops: bool = False, out: str = "runs", model: str = "gpt2-medium",
           keep_last: int = 3) -> list[Check]:
    found = _versions() + _devices() + [_bf16()] + _ops(build_ops) + [_disk(out, model, keep_last), _launch_env()]
    return found


def run(*, build_ops: bool = False, out: str = "runs", model: str = "gpt2-medium", keep_last: int = 3,
        json_output: bool = False) -> dict:
    """`doctor`: run every check, print them (or one JSON line), exit 1 if any fails; returns the report."""
    found = checks(build_ops=build_ops, out=out, model=model, keep_last=keep_last)
    result = {"ok": not any(c.status == "fail" for c in found),
              "fails": sum(c.status == "fail" for c in found), "warnings": sum(c.status == "warn" for c in found),
              "checks": [asdict(c) for c in found]}
    if json_output:
        print(json.dumps(result))
    else:
        marks = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL"}
        for c in found:
            print(f"[{marks[c.status]}] {c.name:<14} {c.detail}")
            if c.fix and c.status != "ok":
                print(f"       {'':<14} fix: {c.fix}")
        print(f"\n{result['fails']} problem(s), {result['warnings']} warning(s)")
    if not result["ok"]:
        raise SystemExit(1)
    return result
