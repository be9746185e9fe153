"""Fault injection on real DeepSpeed processes (tiny preset, CPU, gloo, 2 ranks): nothing lost, ever.

- kill -9 of the whole launcher process group at a random step, or while a checkpoint is being
  written, then `--resume auto`: every loss / lr / grad norm ever logged equals the uninterrupted
  run's bitwise, and no checkpoint that was announced complete (COMPLETE marker) is damaged;
- kill -9 of one rank: the launcher and the other rank exit non-zero within a timeout, resume works;
- a save that cannot write (file-size limit: EFBIG, as a full disk gives ENOSPC): one `Error:` line,
  the previous complete checkpoint and `latest` intact, resume works;
- truncated / missing / zero-byte checkpoint files and a stale `latest`: `--resume auto` falls back to
  the newest sound checkpoint and says so; `--resume PATH` to a damaged one fails clearly.
The reference is one uninterrupted run with the same --max-steps (the LR schedule depends on it).
"""
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from helpers import TINY_ARGS, run_cli, shm_buffers, start_cli, training_records

from trainer import checkpoint
from trainer.errors import UserError

STEPS = 24
ARGS = [*TINY_ARGS, "--global-batch", "8", "--max-steps", str(STEPS), "--save-every", "2", "--keep-last", "3",
        "--no-tracking", "--ds-config", "zero2_fp32"]


def pretrain_args(data, out, *extra) -> list:
    return ["pretrain", *ARGS, "--data", str(data), "--out", str(out), *extra]


def run(args, ranks=2, **kwargs):
    return run_cli(args, ranks=ranks, **kwargs)


def logged(run_dir: Path) -> list[dict]:
    """Every complete training record in metrics.jsonl (a resumed run appends; steps repeat)."""
    return training_records(run_dir)


def by_step(run_dir: Path) -> dict:
    return {r["step"]: r for r in logged(run_dir)}  # the last record of a step wins


def assert_on_reference_trajectory(run_dir: Path, reference: Path):
    """Every record ever logged (the faulted process's, then the resumed run's) is the reference's, bitwise:
    weights, optimizer state (CPU Adam's running bias correction included), data cursor, RNG and schedule
    are all restored exactly."""
    ref = by_step(reference)
    assert sorted(by_step(run_dir)) == list(range(1, STEPS + 1))
    for r in logged(run_dir):
        want = ref[r["step"]]
        assert (r["lr"], r["tokens"]) == (want["lr"], want["tokens"]), f"step {r['step']}: schedule or data moved"
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), f"step {r['step']} differs"


def assert_complete_checkpoints_sound(run_dir: Path) -> list[Path]:
    """Each checkpoint with a COMPLETE marker has all its files, each loadable; `latest` names one of them."""
    complete = checkpoint.complete_checkpoints(run_dir)
    for ckpt in complete:
        assert checkpoint.damage(ckpt) is None, ckpt
        for f in ckpt.rglob("*.pt"):
            torch.load(f, map_location="cpu", weights_only=False)
    latest = checkpoint.checkpoints_dir(run_dir) / checkpoint.LATEST
    if latest.is_file() and complete:
        named = latest.read_text().strip()
        # `latest` is replaced right after a marker, so it names a complete checkpoint (maybe one being pruned)
        assert (checkpoint.checkpoints_dir(run_dir) / named / checkpoint.MARKER).is_file() or \
            named not in {c.name for c in complete}, named
    return complete


def kill_group_when(proc: subprocess.Popen, condition, timeout=300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before the fault could be injected"
        assert time.time() < deadline, "timed out waiting for the moment to inject the fault"
        time.sleep(0.003)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def saving_now(run_dir: Path, at_least: int):
    """True while a step_N dir (N >= at_least) exists without its COMPLETE marker: save_checkpoint is running."""
    root = checkpoint.checkpoints_dir(run_dir)

    def check():
        return any(int(p.name[5:]) >= at_least and not (p / checkpoint.MARKER).exists()
                   for p in root.glob("step_*") if p.is_dir()) if root.is_dir() else False
    return check


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    """The uninterrupted run (keep-last 0 here: its checkpoints also serve the damage tests)."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run(pretrain_args(data, run_dir, "--keep-last", "0"))
    assert sorted(by_step(run_dir)) == list(range(1, STEPS + 1))
    return run_dir


# ---- 1. kill -9 of the whole process group, then resume ----------------------------------------------------

KILLS = [("step", 11), ("save", 23), ("step", 5), ("save", 7), ("step", 17)]  # (where, seed) pairs


@pytest.mark.parametrize("where, seed", [pytest.param(*k, marks=pytest.mark.extended if i == 0 else pytest.mark.slow)
                                         for i, k in enumerate(KILLS)], ids=[f"{w}-{s}" for w, s in KILLS])
def test_kill9_process_group_then_resume_is_bitwise(data, reference, tmp_path, where, seed):
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    proc = start_cli(pretrain_args(data, run_dir), tmp_path / "killed.log")
    if where == "step":
        step = rng.randint(2, STEPS - 4)
        kill_group_when(proc, lambda: len(logged(run_dir)) >= step)
    else:  # while save_checkpoint writes step_N (N >= a random even step)
        kill_group_when(proc, saving_now(run_dir, rng.randrange(2, STEPS - 2, 2)))
    assert proc.returncode == -signal.SIGKILL
    assert max([r["step"] for r in logged(run_dir)], default=0) < STEPS, "killed after the end: nothing to resume"
    assert not shm_buffers(), "a killed 2-rank run left DeepSpeed's all-reduce buffers in /dev/shm (RAM)"
    assert_complete_checkpoints_sound(run_dir)

    resumed = run(pretrain_args(data, run_dir, "--json"))
    result = json.loads(next(line for line in reversed(resumed.stdout.splitlines()) if line.startswith("{")))
    assert result["step"] == STEPS
    if checkpoint.complete_checkpoints(run_dir):
        assert "resumed from" in resumed.stdout
    assert_on_reference_trajectory(run_dir, reference)
    assert_complete_checkpoints_sound(run_dir)
    assert (checkpoint.checkpoints_dir(run_dir) / "latest").read_text().strip() == checkpoint.tag_for(STEPS)


@pytest.mark.extended
def test_a_build_lock_left_by_a_killed_process_does_not_hang_the_next_run(data, tmp_path):
    """torch's JIT build lock (a `lock` file beside a DeepSpeed op such as ZeRO-Offload's CPU Adam, taken at every
    load) left by a process killed at that moment would make every later run wait forever inside
    deepspeed.initialize with torch's own lock. A run takes such a leftover lock over and removes it."""
    from torch.utils.cpp_extension import _get_build_directory

    args = ["pretrain", *TINY_ARGS, "--data", str(data), "--max-steps", "1", "--save-every", "0", "--no-tracking",
            "--ds-config", "zero2_offload_bf16"]
    run_cli([*args, "--out", str(tmp_path / "first")])  # the op is built (or loaded) once
    lock = Path(_get_build_directory("cpu_adam", verbose=False)) / "lock"
    lock.touch()  # what kill -9 in the middle of a load leaves
    try:
        run_cli([*args, "--out", str(tmp_path / "second")], timeout=120)
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)  # never leave it for the rest of the suite


# ---- 2. kill -9 of one rank --------------------------------------------------------------------------------

def rank_pids(session: int, rank: int) -> list[int]:
    """Processes of this session started with --local_rank=RANK (the deepspeed launcher's workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            if os.getsid(int(entry.name)) == session and f"--local_rank={rank}".encode() in cmdline:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killing_one_rank_stops_the_others_then_resume_works(data, reference, tmp_path, victim):
    run_dir = tmp_path / "run"
    proc = start_cli(pretrain_args(data, run_dir), tmp_path / "run.log")
    deadline = time.time() + 300
    while len(logged(run_dir)) < 7:
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()[-3000:]
        time.sleep(0.003)
    pids = rank_pids(proc.pid, victim)
    assert len(pids) == 1, pids
    os.kill(pids[0], signal.SIGKILL)
    started = time.time()
    try:
        code = proc.wait(timeout=120)  # no hang: the launcher notices and stops the surviving rank
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert code != 0 and time.time() - started < 120
    time.sleep(1)
    assert rank_pids(proc.pid, 1 - victim) == [], "the surviving rank is still running"
    assert_complete_checkpoints_sound(run_dir)
    run(pretrain_args(data, run_dir))
    assert_on_reference_trajectory(run_dir, reference)


# ---- 3. a save that cannot write -----------------------------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():  # inherited by the launcher and the ranks: any write past `limit` bytes fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_save_that_cannot_write_stops_clearly_and_keeps_the_last_checkpoint(data, reference, tmp_path):
    run_dir = tmp_path / "run"
    run(pretrain_args(data, run_dir, "--stop-after-steps", "4"))
    before = {p: p.read_bytes() for p in (run_dir / "checkpoints").rglob("*") if p.is_file()}
    # Optimizer shards are ~750 KB: the next save (step 6) cannot be written; metrics lines still can.
    proc = run(pretrain_args(data, run_dir), check=False, preexec_fn=_file_size_limit(300_000))
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error: ")]
    assert errors and "could not write checkpoint step_0000006" in errors[0] and "File too large" in errors[0]
    assert "step_0000004 is complete and intact" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert not (run_dir / "checkpoints" / "step_0000006" / checkpoint.MARKER).exists()
    assert all(p.read_bytes() == content for p, content in before.items() if p.exists())
    assert all(p.exists() for p in before if p.name != "latest")
    assert_complete_checkpoints_sound(run_dir)
    run(pretrain_args(data, run_dir))  # room again: resume from step 4 and finish on the same trajectory
    assert_on_reference_trajectory(run_dir, reference)


def test_oserror_in_save_becomes_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "checkpoints" / "step_0000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000002" / checkpoint.MARKER).write_text("{}")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "checkpoints" / "step_0000004" / "x.pt"))

    monkeypatch.setattr(checkpoint.engine_io, "_write", disk_full)
    with pytest.raises(UserError, match=r"could not write checkpoint step_0000004 \(No space left on device: .*x.pt\)"
                                        r"; free disk space .* step_0000002 is complete and intact"):
        checkpoint.save(None, tmp_path, 4, {})


# ---- 4. damaged checkpoints and a stale `latest` --------------------------------------------------------------

def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


DAMAGE = {
    "truncated optimizer shard": lambda c: _truncate(c / "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    "missing model states": lambda c: (c / "mp_rank_00_model_states.pt").unlink(),
    "zero-byte rng file": lambda c: (c / "rng" / "rank_0.pt").write_bytes(b""),
    "unreadable marker": lambda c: (c / checkpoint.MARKER).write_text("{not json"),
}
WHAT = {"truncated optimizer shard": "truncated", "missing model states": "is missing",
        "zero-byte rng file": "0 bytes", "unreadable marker": "marker is unreadable"}


@pytest.fixture
def damaged_copy(reference, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    return run_dir


@pytest.mark.parametrize("kind", DAMAGE)
def test_resume_auto_falls_back_past_damaged_checkpoints(damaged_copy, kind, capsys):
    newest = checkpoint.complete_checkpoints(damaged_copy)[-1]
    assert newest.name == checkpoint.tag_for(STEPS) and checkpoint.find_resume(damaged_copy, "auto") == newest
    DAMAGE[kind](newest)
    assert checkpoint.damage(newest) is not None and WHAT[kind] in checkpoint.damage(newest)
    chosen = checkpoint.find_resume(damaged_copy, "auto")
    assert chosen.name == checkpoint.tag_for(STEPS - 2)
    out = capsys.readouterr().out
    assert f"newest checkpoint {newest.name}" in out and WHAT[kind] in out and f"falling back to {chosen.name}" in out
    assert checkpoint.find_resume(damaged_copy, str(damaged_copy)) == chosen  # a run dir behaves like auto
    with pytest.raises(UserError, match=f"--resume {newest}: checkpoint .* is damaged .*{WHAT[kind]}"):
        checkpoint.find_resume(damaged_copy, str(newest))


def test_stale_latest_and_all_damaged(damaged_copy, capsys):
    ckpts = checkpoint.complete_checkpoints(damaged_copy)
    shutil.rmtree(ckpts[-1])  # `latest` now names a checkpoint that is gone
    assert checkpoint.find_resume(damaged_copy, "auto") == ckpts[-2]
    assert f"names {ckpts[-1].name}; resuming from the newest complete checkpoint {ckpts[-2].name}" in \
        capsys.readouterr().out
    (ckpts[-2] / checkpoint.MARKER).unlink()  # an interrupted save: skipped silently, it never counted
    assert checkpoint.find_resume(damaged_copy, "auto") == ckpts[-3]
    for ckpt in ckpts[:-2]:
        _truncate(ckpt / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="every complete checkpoint in .* is damaged .* --resume never"):
        checkpoint.find_resume(damaged_copy, "auto")


@pytest.mark.slow
def test_real_resume_from_a_truncated_newest_checkpoint(data, reference, damaged_copy):
    """End to end: the run resumes from the newest sound checkpoint, says so, and still ends bitwise on track."""
    DAMAGE["truncated optimizer shard"](damaged_copy / "checkpoints" / checkpoint.tag_for(STEPS - 2))
    shutil.rmtree(damaged_copy / "checkpoints" / checkpoint.tag_for(STEPS))  # as if it had died before the end
    broken = damaged_copy / "checkpoints" / checkpoint.tag_for(STEPS - 2)
    proc = run(pretrain_args(data, damaged_copy, "--resume", str(broken)), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"Error: --resume {broken}: checkpoint {broken} is damaged" in proc.stderr
    proc = run(pretrain_args(data, damaged_copy))
    assert f"falling back to {checkpoint.tag_for(STEPS - 4)}" in proc.stdout
    assert f"resumed from {damaged_copy / 'checkpoints' / checkpoint.tag_for(STEPS - 4)}" in proc.stdout
    assert_on_reference_trajectory(damaged_copy, reference)
    assert_complete_checkpoints_sound(damaged_copy)


@pytest.mark.slow
def test_whole_trajectory_is_bitwise_after_resume(data, reference, tmp_path):
    """Failed before DeepSpeed's CPU Adam was given back its running beta powers on load: the first update
    after a resume rounded some fp32 master weights differently, and the losses drifted a few steps later."""
    run_dir = tmp_path / "run"
    run(pretrain_args(data, run_dir, "--stop-after-steps", "14"))
    run(pretrain_args(data, run_dir))
    assert_on_reference_trajectory(run_dir, reference)
