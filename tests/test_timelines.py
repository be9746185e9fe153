"""Whole run timelines on one run directory (bench/timelines.py has the generator and the invariants).

The extended suite (CI) runs one short seeded timeline and a rewind followed by a tighter --keep-last;
`python bench/timelines.py --seeds 50` runs the long version.
"""
import pytest

from bench import timelines
from trainer import checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("timelines")


@pytest.fixture(scope="module")
def reference(data, workdir):
    return timelines.make_reference(data, workdir)


@pytest.mark.extended
def test_a_random_timeline_keeps_every_invariant(data, reference, workdir):
    timeline = timelines.Timeline(data, reference, workdir, seed=3)
    result = timeline.run(n_ops=6)  # raises timelines.Violation naming the invariant that broke
    assert result["checks"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("seed", [5, 8])
def test_more_random_timelines(data, reference, workdir, seed):
    assert timelines.Timeline(data, reference, workdir, seed=seed).run(n_ops=7)["checks"] == 7


@pytest.mark.extended
def test_rewind_then_keep_last_keeps_the_new_checkpoint(data, workdir):
    """6 steps saved every 2 with --keep-last 2 (step_4, step_6), then a rewind to step_4 saving every step
    with --keep-last 1: step_5 stays (pruning must never delete the checkpoint just written, or `latest` would
    name a missing directory and --resume auto go back to the abandoned step_6)."""
    run_dir = workdir / "rewind"
    settings = timelines.Settings(keep_last=2, save_every=2)
    first = timelines.Timeline(data, {}, workdir, seed=0)
    first.run_dir, first.settings = run_dir, settings
    first.launch("--stop-after-steps", 6)
    assert [c.name for c in checkpoint.complete_checkpoints(run_dir)] == ["step_0000004", "step_0000006"]

    first.settings = timelines.Settings(keep_last=1, save_every=1)
    step4 = checkpoint.checkpoints_dir(run_dir) / "step_0000004"
    first.launch("--resume", step4, "--stop-after-steps", 1)
    assert [c.name for c in checkpoint.complete_checkpoints(run_dir)] == ["step_0000005"]
    assert checkpoint.read_latest(run_dir) == "step_0000005"
    [aside] = (checkpoint.checkpoints_dir(run_dir) / checkpoint.ABANDONED).glob("*/step_0000006")
    assert checkpoint.is_complete(aside) and checkpoint.damage(aside) is None
    log = (workdir / "rewind.log").read_text()
    assert "step_0000006 belong to an abandoned timeline and were moved to" in log

    first.launch("--stop-after-steps", 1)  # --resume auto continues the new timeline, from step_5
    last = timelines.invocations(run_dir)[-1]
    assert last["start"] == 5 and [r["step"] for r in last["steps"]] == [6]
