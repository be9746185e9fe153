"""Random run timelines on one run directory, every invariant checked after every operation.

    python bench/timelines.py --seeds 50            # 50 timelines (one to three minutes each on 2 CPU cores)
    python bench/timelines.py --seeds 5 --first 100 --ops 10 --json

A timeline is a seeded sequence of operations on one run directory of the tiny preset (2 ranks,
ZeRO-2 bf16, 12 steps, the pydoc byte shards): train k steps and pause (--stop-after-steps), kill -9
the launcher's process group at a random moment (after a step, in the middle of a save, or after a
random delay: during start-up, a universal conversion or a rewind), resume to the end, rewind to an
older checkpoint, change the ZeRO stage (1/2/3) or the rank count (1/2), change --lr, change
--keep-last. After every operation:

  bitwise       every step logged by an invocation whose whole history ran the reference settings
                (ZeRO-2, 2 ranks, the reference --lr) equals the uninterrupted reference run bitwise
                (loss, grad norm, lr, tokens), rewinds and kills included
  schedule      every logged lr is the schedule's value for that step under the --lr in effect, and the
                optimizer's groups hold the asked-for betas, eps and weight decay (0 for no-decay)
  checkpoints   no complete checkpoint of the current timeline is lost: it is still there, or --keep-last
                pruned it with enough newer ones present, or a rewind moved it to checkpoints/abandoned/;
                every complete checkpoint is sound and none is newer than the run's progress
  latest        `latest` names the newest complete checkpoint (and exists exactly when one does)
  exit          an operation not killed exits 0, within its timeout (a hang is a failure), except a resume
                across the ZeRO-3 boundary, which DeepSpeed cannot do: that one must be refused with its
                one-line error before anything changes

Each operation is one launch of `python -m trainer.cli pretrain` (the deepspeed launcher for 2 ranks).
"""
import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import EXACT, available_ranks, cli_command, launch_env  # noqa: E402 (repository on sys.path first)

STEPS, LR, MIN_LR, WARMUP = 12, 2e-3, 2e-4, 3
BETAS, EPS, WEIGHT_DECAY = (0.9, 0.95), 1e-8, 0.1
LAUNCH_TIMEOUT = 300


@dataclass(frozen=True)
class Settings:
    stage: int = 2
    ranks: int = min(2, available_ranks())  # one per GPU on a GPU machine (bitwise there under --deterministic)
    lr: float = LR
    keep_last: int = 0
    save_every: int = 2

    def numerics(self):
        """What decides the numbers (--keep-last and --save-every do not)."""
        return self.stage, self.ranks, self.lr


REFERENCE = Settings()


def expected_lr(step: int, max_lr: float) -> float:
    """The cosine schedule with warmup, written out here independently of trainer/train/optim.py."""
    if step < WARMUP:
        return max_lr * (step + 1) / WARMUP
    progress = min(1.0, (step - WARMUP) / (STEPS - WARMUP))
    return MIN_LR + 0.5 * (max_lr - MIN_LR) * (1 + math.cos(math.pi * progress))


def pretrain_args(data: Path, out: Path, s: Settings, *extra) -> list:
    return ["pretrain", "--model", "tiny", "--data", str(data), "--out", str(out), "--seq-len", "64",
            "--micro-batch", "2", "--global-batch", "8", "--lr", str(s.lr), "--min-lr", str(MIN_LR),
            "--warmup-steps", str(WARMUP), "--max-steps", str(STEPS), "--eval-every", "0", "--log-every", "1",
            "--seed", "11", "--no-tracking", "--ds-config", f"zero{s.stage}_bf16", "--save-every", str(s.save_every),
            "--keep-last", str(s.keep_last), *EXACT, *map(str, extra)]


class Violation(AssertionError):
    pass


def check(condition, invariant: str, message: str):
    if not condition:
        raise Violation(f"[{invariant}] {message}")


# ---- reading a run directory -------------------------------------------------------------------

def invocations(run_dir: Path) -> list[dict]:
    """Each pretrain invocation that got as far as its start event: [{start, hparams, steps}], its training
    records being the metrics.jsonl lines from the one its start event names to the next one's."""
    def lines(name):  # a line still being written has no newline yet
        path = run_dir / name
        return path.read_text().split("\n")[:-1] if path.is_file() else []

    def parse(line):  # a line a kill -9 cut short (the writer ends it before appending more) is skipped
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            return {}

    starts = [e for e in map(parse, lines("events.jsonl")) if e.get("event") == "start"]
    metrics = lines("metrics.jsonl")
    bounds = [e["metrics_line"] for e in starts] + [len(metrics)]
    return [{"start": e["step"], "hparams": e["hyperparameters"],
             "steps": [r for r in map(parse, metrics[bounds[i]:bounds[i + 1]]) if "loss" in r]}
            for i, e in enumerate(starts)]


def complete(run_dir: Path) -> dict:
    """{tag: inode of its COMPLETE marker} of the current timeline (a rewritten checkpoint gets a new inode)."""
    from trainer import checkpoint

    return {c.name: (c / checkpoint.MARKER).stat().st_ino for c in checkpoint.complete_checkpoints(run_dir)}


def abandoned(run_dir: Path) -> set:
    from trainer import checkpoint

    root = checkpoint.checkpoints_dir(run_dir) / checkpoint.ABANDONED
    return {p.name for p in root.glob("*/step_*") if checkpoint.is_complete(p)} if root.is_dir() else set()


# ---- one timeline ------------------------------------------------------------------------------

class Timeline:
    def __init__(self, data: Path, reference: dict, workdir: Path, seed: int, log=print):
        from trainer import checkpoint

        self.checkpoint = checkpoint
        self.data, self.reference, self.rng, self.log = data, reference, random.Random(seed), log
        self.run_dir = workdir / f"timeline-{seed}"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.settings = REFERENCE
        self.pure = {}       # tag -> True when its whole history ran the reference settings
        self.inodes = {}     # tag -> marker inode, as of the last check
        self.seen_invocations = 0
        self.rewind_to = None  # the step a rewind operation asked for
        self.ops, self.checks = [], 0

    # -- launching --

    def launch(self, *extra, kill=None) -> str:
        """One pretrain invocation; with `kill`, kill -9 its process group when that moment comes."""
        args = pretrain_args(self.data, self.run_dir, self.settings, *extra)
        log_file = self.run_dir.parent / f"{self.run_dir.name}.log"
        with open(log_file, "a") as out:
            out.write(f"\n=== {' '.join(args)} (kill: {kill})\n")
            out.flush()
            proc = subprocess.Popen(cli_command(args, self.settings.ranks), cwd=REPO, env=launch_env(), stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            outcome = self._wait(proc, kill)
        if outcome == "exit 0" or outcome.startswith("killed"):
            return outcome
        tail = log_file.read_text()[-3000:]
        if outcome == "exit 1" and "across the ZeRO-3 boundary" in tail:
            return "refused (ZeRO-3 boundary)"  # documented: DeepSpeed's universal checkpoint does not cross it
        raise Violation(f"[exit] {outcome}: {' '.join(args)}\n{tail}")

    def _wait(self, proc, kill) -> str:
        deadline = time.time() + LAUNCH_TIMEOUT
        logged_before = sum(len(i["steps"]) for i in invocations(self.run_dir))
        started = time.time()
        while proc.poll() is None:
            if time.time() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return f"hung (killed after {LAUNCH_TIMEOUT} s)"
            if kill is not None and self._moment(kill, logged_before, started):
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return f"killed ({kill[0]})"
            time.sleep(0.003)
        return f"exit {proc.returncode}"

    def _moment(self, kill, logged_before: int, started: float) -> bool:
        kind, value = kill
        if kind == "after-steps":
            return sum(len(i["steps"]) for i in invocations(self.run_dir)) >= logged_before + value
        if kind == "saving":
            return any(not self.checkpoint.is_complete(p) for p in self.checkpoint.step_dirs(self.run_dir))
        return time.time() - started >= value  # "delay"

    # -- operations --

    def progress(self) -> int:
        inv = invocations(self.run_dir)
        return max([inv[-1]["start"], *[r["step"] for r in inv[-1]["steps"]]]) if inv else 0

    def pause_after(self) -> list:
        return ["--stop-after-steps", self.rng.randint(1, 4)]

    def op_train(self):
        return "train", self.launch(*self.pause_after())

    def op_finish(self):
        return "finish", self.launch()

    def op_kill(self):
        kind = self.rng.choice(["after-steps", "saving", "delay"])
        value = {"after-steps": self.rng.randint(1, 5), "saving": None,
                 "delay": round(self.rng.uniform(0.5, 12), 2)}[kind]
        return f"kill {kind} {value}", self.launch(kill=(kind, value))

    def op_rewind(self):
        older = list(self.inodes)[:-1]
        if not older:
            return self.op_train()
        tag = self.rng.choice(older)
        self.rewind_to = self.checkpoint.step_of(tag)
        path = self.checkpoint.checkpoints_dir(self.run_dir) / tag
        return f"rewind {tag}", self.launch("--resume", path, *self.pause_after())

    def op_zero(self):
        stage = self.rng.choice([s for s in (1, 2, 3) if s != self.settings.stage])
        self.settings = dataclasses.replace(self.settings, stage=stage)
        return f"zero {stage}", self.launch(*self.pause_after())

    def op_ranks(self):
        if available_ranks() < 2:  # one GPU: no other rank count to move to
            return self.op_train()
        self.settings = dataclasses.replace(self.settings, ranks=3 - self.settings.ranks)
        return f"ranks {self.settings.ranks}", self.launch(*self.pause_after())

    def op_lr(self):
        lr = self.rng.choice([x for x in (LR, LR / 2, LR * 1.5) if x != self.settings.lr])
        self.settings = dataclasses.replace(self.settings, lr=lr)
        return f"lr {lr:g}", self.launch(*self.pause_after())

    def op_keep(self):
        keep = self.rng.choice([k for k in (0, 1, 2, 3) if k != self.settings.keep_last])
        save_every = self.rng.choice([1, 2, 3])
        self.settings = dataclasses.replace(self.settings, keep_last=keep, save_every=save_every)
        return f"keep-last {keep} save-every {save_every}", self.launch(*self.pause_after())

    OPS = {"train": (op_train, 3), "kill": (op_kill, 4), "finish": (op_finish, 1), "rewind": (op_rewind, 2),
           "zero": (op_zero, 1), "ranks": (op_ranks, 1), "lr": (op_lr, 1), "keep": (op_keep, 2)}

    def run(self, n_ops: int) -> dict:
        names = list(self.OPS)
        weights = [self.OPS[n][1] for n in names]
        for i in range(n_ops):
            name = self.rng.choices(names, weights)[0] if i < n_ops - 1 else "finish"
            before = (complete(self.run_dir), abandoned(self.run_dir))
            self.rewind_to = None
            what, outcome = self.OPS[name][0](self)
            if outcome.startswith("refused"):  # go back to the ZeRO stage of the checkpoint it would resume
                target = self.rewind_to if self.rewind_to is not None else max(map(self.checkpoint.step_of, before[0]))
                marker = self.checkpoint.read_marker(self.checkpoint.checkpoints_dir(self.run_dir) /
                                                     self.checkpoint.tag_for(target))
                self.settings = dataclasses.replace(self.settings, stage=marker["zero_stage"])
            self.ops.append(f"{what}: {outcome}")
            self.log(f"  {self.run_dir.name} op {i + 1}/{n_ops} {what}: {outcome} (step {self.progress()})")
            self.verify(*before, self.settings, intended_start=self.rewind_to)
        check(self.progress() == STEPS, "exit", f"the final resume ended at step {self.progress()}, not {STEPS}")
        return {"ops": self.ops, "checks": self.checks}

    # -- invariants --

    def verify(self, before: dict, abandoned_before: set, settings: Settings, intended_start=None) -> None:
        ck = self.checkpoint
        inv = invocations(self.run_dir)
        new = inv[self.seen_invocations:]
        check(len(new) <= 1, "exit", f"one launch logged {len(new)} invocations")
        now = complete(self.run_dir)
        written = {tag for tag, ino in now.items() if before.get(tag) != ino}
        if new:
            start = new[0]["start"]
            if start == 0:
                pure_start = True
            else:
                tag = ck.tag_for(start)
                check(tag in before, "checkpoints", f"resumed from {tag}, which was not a complete checkpoint of the "
                      f"timeline ({sorted(before)})")
                pure_start = self.pure[tag]
            check(intended_start is None or start == intended_start, "checkpoints",
                  f"started at step {start}, expected {intended_start}")
            pure = pure_start and settings.numerics() == REFERENCE.numerics()
            self._check_invocation(new[0], pure, settings)
            for tag in written:
                self.pure[tag] = pure
            self.seen_invocations = len(inv)
        else:
            check(not written, "checkpoints", f"checkpoints {sorted(written)} appeared without an invocation")
            start = intended_start if intended_start is not None else max(map(ck.step_of, before), default=0)
        self._check_checkpoints(before, abandoned_before, now, start, settings)
        self.inodes = now
        self.checks += 1

    def _check_invocation(self, invocation: dict, pure: bool, settings: Settings) -> None:
        for group, h in invocation["hparams"].items():
            want = expected_lr(invocation["start"], settings.lr)
            check(h["lr"] == want, "schedule", f"{group} lr {h['lr']} at start, expected {want}")
            check(tuple(h["betas"]) == BETAS and h["eps"] == EPS, "schedule", f"{group}: {h}")
            check(h["weight_decay"] == (WEIGHT_DECAY if group == "decay" else 0.0), "schedule", f"{group}: {h}")
        for r in invocation["steps"]:
            want = expected_lr(r["step"] - 1, settings.lr)
            check(abs(r["lr"] - want) <= 1e-12 * want, "schedule", f"step {r['step']}: lr {r['lr']}, expected {want}")
            if pure:
                ref = self.reference[r["step"]]
                got, want = ([x[k] for k in ("loss", "grad_norm", "lr", "tokens")] for x in (r, ref))
                check(got == want, "bitwise", f"step {r['step']}: {got} != reference {want}")

    def _check_checkpoints(self, before: dict, abandoned_before: set, now: dict, start, settings: Settings) -> None:
        ck = self.checkpoint
        progress = self.progress()
        steps_now = sorted(ck.step_of(t) for t in now)
        for tag in before:
            if tag in now:
                continue
            step = ck.step_of(tag)
            pruned = settings.keep_last and sum(s > step for s in steps_now) >= settings.keep_last
            set_aside = start < step and tag in abandoned(self.run_dir)
            check(pruned or set_aside, "checkpoints",
                  f"{tag} disappeared (keep-last {settings.keep_last}, complete now {sorted(now)}, start {start})")
        check(not steps_now or steps_now[-1] <= progress, "checkpoints",
              f"checkpoint {steps_now[-1] if steps_now else None} is newer than the run's progress {progress}")
        for tag in now:
            check(ck.damage(ck.checkpoints_dir(self.run_dir) / tag) is None, "checkpoints", f"{tag} is damaged")
        latest = ck.read_latest(self.run_dir)
        check(latest == (max(now, key=ck.step_of) if now else None), "latest",
              f"latest names {latest}, the newest complete checkpoint is {max(now, key=ck.step_of) if now else None}")
        check(abandoned_before <= abandoned(self.run_dir), "checkpoints", "an abandoned checkpoint disappeared")


# ---- the reference and the driver --------------------------------------------------------------

def make_data(workdir: Path) -> Path:
    from trainer.data.convert import convert

    out = workdir / "pydoc-bytes"
    convert("pydoc", "bytes", out, shard_tokens=200_000, val_tokens=20_000, workers=1, progress=False)
    return out


def make_reference(data: Path, workdir: Path) -> dict:
    """The uninterrupted run with the reference settings: {step: record}."""
    run_dir = workdir / "reference"
    if not (run_dir / "metrics.jsonl").is_file() or len(invocations(run_dir)[0]["steps"]) != STEPS:
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = subprocess.run(cli_command(pretrain_args(data, run_dir, REFERENCE), REFERENCE.ranks), cwd=REPO,
                              env=launch_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
        if proc.returncode != 0:
            raise RuntimeError(f"reference run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    [only] = invocations(run_dir)
    return {r["step"]: r for r in only["steps"]}


def run_timelines(seeds, n_ops: int, workdir: Path, log=print) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    data = make_data(workdir)
    reference = make_reference(data, workdir)
    results, failures = {}, {}
    for seed in seeds:
        started = time.time()
        timeline = Timeline(data, reference, workdir, seed, log=log)
        try:
            results[seed] = timeline.run(n_ops)
        except Violation as e:
            failures[seed] = {"ops": timeline.ops, "violation": str(e)}
            log(f"timeline {seed}: VIOLATION {str(e)[:2000]}")
        else:
            log(f"timeline {seed}: {len(timeline.ops)} operations, every invariant held "
                f"({time.time() - started:.0f} s)")
            shutil.rmtree(timeline.run_dir, ignore_errors=True)
    return {"timelines": len(results) + len(failures), "held": len(results),
            "operations": sum(len(r["ops"]) for r in results.values()) + sum(len(f["ops"]) for f in failures.values()),
            "checks": sum(r["checks"] for r in results.values()), "failures": failures,
            "kills": sum(op.split(":")[0].startswith("kill") and "killed" in op
                         for r in results.values() for op in r["ops"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10, help="number of timelines")
    parser.add_argument("--first", type=int, default=0, help="first seed")
    parser.add_argument("--ops", type=int, default=8, help="operations per timeline (the last one finishes the run)")
    parser.add_argument("--workdir", type=Path, default=None, help="where run directories go [a temp dir]")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON line")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="timelines-"))
    summary = run_timelines(range(args.first, args.first + args.seeds), args.ops, workdir,
                            log=lambda m: print(m, file=sys.stderr if args.json else sys.stdout, flush=True))
    print(f"{summary['held']} of {summary['timelines']} timelines held every invariant: {summary['operations']} "
          f"operations ({summary['kills']} kill -9), {summary['checks']} checks",
          file=sys.stderr if args.json else None)
    if args.json:
        print(json.dumps(summary))
    sys.exit(0 if not summary["failures"] else 1)


if __name__ == "__main__":
    main()
