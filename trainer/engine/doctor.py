"""Pre-flight check before a long run (`python -m trainer.cli doctor`).

Each check is ok / warn / fail with what was found and, when it is not ok, the fix. For every shipped
DeepSpeed config it says which optimizer code runs here (torch's AdamW needs no build; DeepSpeed's
FusedAdam and CPU Adam are C++/CUDA ops built on first use). An op that is not built yet is not built
by default: what would break its build (no compiler or nvcc, a TORCH_CUDA_ARCH_LIST entry DeepSpeed
cannot parse, nvcc and torch on different CUDA versions) is detected instead, and `--build-ops` builds
it. A fail means the run would crash; a warn means it would run, slower, later or on CPU. Exit status 1
when any check fails.
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
        from trainer.engine import build as engine

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
    checks = [Check("gpus", "ok", f"{len(names)} visible: {detail}")]
    if len(names) > 1 and any(is_consumer_card(n) for n in names):
        checks.append(peer_to_peer_check([_p2p_facts(0, j) for j in range(1, len(names))]))
    return checks


def is_consumer_card(name: str) -> bool:
    return "GeForce" in name or "TITAN" in name


P2P_FIX = "export NCCL_P2P_DISABLE=1 before launching (NCCL then goes through host memory, a little slower)"


def peer_to_peer_check(pairs: list[dict]) -> Check:
    """Consumer cards (GeForce / TITAN) without NVLink: NCCL's peer-to-peer copies over PCIe are known to
    hang or corrupt data on many such boards (IOMMU / ACS in the way, or P2P the driver offers but the
    board cannot do), and the run then hangs at its first all-reduce with no message. `pairs` holds, per
    pair of GPUs, {"pair", "peer_access", "nvlink", "copy"}: copy is "ok", "wrong" or "hung" (a timed copy
    test in a child process) or None where it was not run."""
    bad = [p for p in pairs if p["copy"] in ("wrong", "hung")]
    if bad:
        found = ", ".join(f"GPUs {p['pair'][0]}-{p['pair'][1]}: P2P copy {p['copy']}" for p in bad)
        return Check("p2p", "fail", f"peer-to-peer over PCIe is broken here ({found}): NCCL would hang", P2P_FIX)
    if all(p["nvlink"] or not p["peer_access"] for p in pairs):
        how = "NVLink" if all(p["nvlink"] for p in pairs) else "no P2P offered: NCCL goes through host memory"
        return Check("p2p", "ok", f"consumer GPUs, {how}")
    return Check("p2p", "ok", "consumer GPUs with P2P over PCIe: a copy test between them passed; if a run still "
                 f"hangs at its first step, {P2P_FIX}")


def _p2p_facts(i: int, j: int) -> dict:
    import subprocess
    import sys

    import torch

    facts = {"pair": (i, j), "peer_access": bool(torch.cuda.can_device_access_peer(i, j)), "nvlink": False,
             "copy": None}
    try:
        links = subprocess.run(["nvidia-smi", "nvlink", "--status", "-i", str(i)], capture_output=True, text=True,
                               timeout=10).stdout
        facts["nvlink"] = "GB/s" in links
    except (OSError, subprocess.SubprocessError):
        pass
    if facts["peer_access"] and not facts["nvlink"]:
        code = (f"import torch; a = torch.arange(1 << 22, device='cuda:{i}', dtype=torch.float32); "
                f"b = a.to('cuda:{j}'); torch.cuda.synchronize({j}); print(torch.equal(a.cpu(), b.cpu()))")
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
            facts["copy"] = "ok" if out.strip().endswith("True") else "wrong"
        except subprocess.TimeoutExpired:
            facts["copy"] = "hung"
    return facts


def _bf16() -> Check:
    import torch


    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return Check("bf16", "ok", "the GPU supports bf16: use the *_bf16 configs")
        return Check("bf16", "warn", "this GPU has no bf16 (pre-Ampere)",
                     "use ds_configs/zero2_fp16.json (loss scaling) instead of the bf16 configs")
    from trainer.engine.ds_config import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return Check("bf16", "ok", "the CPU has native bf16 (AVX512-BF16/AMX)")
    return Check("bf16", "warn", "the CPU has no native bf16: bf16 matmuls are emulated, far slower than fp32",
                 "on this machine use --ds-config auto (picks zero2_fp32) or ds_configs/zero2_fp32.json")


def _optimizers(ds_config: str, device_type: str) -> tuple[list[Check], dict]:
    """Which optimizer code each shipped DeepSpeed config runs on this machine, and which of DeepSpeed's ops
    that needs built first; returns the checks and {op: [config names that need it]}."""
    from trainer.engine.ds_config import DS_CONFIG_DIR, load_ds_config, optimizer_implementation, resolve_ds_config_path

    chosen_path = resolve_ds_config_path(ds_config).resolve()  # as the glob spells the shipped ones
    impls = {path: optimizer_implementation(load_ds_config(str(path)), device_type)
             for path in sorted({p.resolve() for p in DS_CONFIG_DIR.glob("*.json")} | {chosen_path})}
    chosen = impls[chosen_path]
    groups, needs = {}, {}
    for path, impl in impls.items():
        groups.setdefault(impl.label, []).append(path.stem)
        if impl.op:
            needs.setdefault(impl.op, []).append(path.stem)
    build = f"op {chosen.op}: built on first use" if chosen.op else "pure PyTorch, nothing to build"
    checks = [Check("optimizer", "ok", f"--ds-config {ds_config} ({chosen_path.name}) runs {chosen.label}; {build}")]
    listing = "; ".join(f"{label}: {', '.join(names)}" for label, names in groups.items())
    checks.append(Check("ds_configs", "ok", listing))
    return checks, {"chosen": chosen.op, **needs}


def _ops(build: bool, needs: dict) -> list[Check]:
    """Each DeepSpeed op some config needs: built, buildable, or what breaks its build."""
    try:
        from trainer.engine import build as engine

        status = engine.op_status([op for op in engine.OP_BUILDERS if op in needs], build=build)
    except Exception as e:
        return [Check("deepspeed ops", "fail", f"could not query op builders: {type(e).__name__}: {e}"[:300],
                      "reinstall deepspeed; run `ds_report` for details")]
    checks = []
    for name, info in status.items():
        if info["state"] == "absent":
            continue
        users = f"used by {', '.join(needs[name])}"
        critical = needs.get("chosen") == name  # the config this machine runs by default / --ds-config
        problems = info["problems"]
        fixes = "; ".join(fix for _, fix in problems)
        if info["state"] in ("prebuilt", "cached", "built"):
            how = {"prebuilt": "prebuilt in the wheel", "cached": "JIT build cached", "built": "built now"}
            checks.append(Check(f"op {name}", "ok", f"{how[info['state']]}; {users}"))
        elif info["state"] == "failed":
            checks.append(Check(f"op {name}", "fail" if critical else "warn",
                                f"failed to build ({info['error']}); {users}",
                                fixes or "run `ds_report` and read the compiler output above"))
        elif problems:
            found = "; ".join(what for what, _ in problems)
            checks.append(Check(f"op {name}", "fail" if critical else "warn",
                                f"not built, and its build would fail here: {found}; {users}", fixes))
        else:
            checks.append(Check(f"op {name}", "warn" if critical else "ok",
                                f"not built yet, built on first use (about a minute, once; compiler and ninja "
                                f"found); {users}", "`python -m trainer.cli doctor --build-ops` builds it now"))
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


def checks(*, build_ops: bool = False, out: str = "runs", model: str = "gpt2-medium", keep_last: int = 3,
           ds_config: str = "auto") -> list[Check]:
    import torch

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    optimizers, needs = _optimizers(ds_config, device_type)
    return (_versions() + _devices() + [_bf16()] + optimizers + _ops(build_ops, needs)
            + [_disk(out, model, keep_last), _launch_env()])


def run(cfg, json_output: bool = False) -> dict:
    """`doctor` (cfg: trainer.config.DoctorConfig): run every check, print them (or one JSON line), exit 1 if any
    fails; returns the report."""
    found = checks(build_ops=cfg.build_ops, out=cfg.out, model=cfg.model, keep_last=cfg.keep_last,
                   ds_config=cfg.ds_config)
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
