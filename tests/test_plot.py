"""`plot RUN [RUN ...] --out curves.png`: curves of several runs side by side, from their metrics.jsonl."""
import json
import math

import pytest
from click.testing import CliRunner

from trainer.cli import cli
from trainer.plot import read_metrics, series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir, steps=10, val_every=5, hellaswag=False, resumed_from=None, tokens_per_step=1024):
    """metrics.jsonl as pretrain writes it; `resumed_from`: steps after it are logged twice (a resume)."""
    run_dir.mkdir(parents=True)
    lines = []

    def log(step, loss_shift=0.0):
        lines.append({"step": step, "loss": 5 * math.exp(-step / 5) + 1 + loss_shift, "lr": 1e-3 * step / steps,
                      "grad_norm": 1.0, "tokens": step * tokens_per_step, "tokens_per_s": 1000.0 + step,
                      "mfu": 0.1, "skipped": 0})
        if step % val_every == 0:
            lines.append({"step": step, "val_loss": 5 * math.exp(-step / 5) + 1.2})
        if hellaswag and step % val_every == 0:
            lines.append({"step": step, "hellaswag_acc": 0.25, "hellaswag_acc_norm": 0.26 + step / 1000,
                          "hellaswag_n": 10})

    for step in range(1, steps + 1):
        log(step, loss_shift=0.5 if resumed_from is not None and step > resumed_from else 0.0)
    if resumed_from is not None:  # the run died after `steps`, resumed from `resumed_from` and logged them again
        for step in range(resumed_from + 1, steps + 1):
            log(step)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def test_plot_writes_a_png_with_the_curves_of_every_run(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    a = write_run(tmp_path / "a" / "run", val_every=5, resumed_from=6)
    b = write_run(tmp_path / "b" / "run", steps=8, val_every=100)  # no val loss records
    out = tmp_path / "plots" / "curves.png"
    figures, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (figures.append(fig), savefig(fig, *a, **k)))
    result = CliRunner().invoke(cli, ["plot", str(a), str(b), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["runs"] == ["run", "b/run"]  # same directory names are told apart
    assert report["panels"] == {"loss": ["run", "b/run"], "val_loss": ["run"], "lr": ["run", "b/run"],
                                "tokens_per_s": ["run", "b/run"]}  # no HellaSwag logged: no panel
    assert out.read_bytes()[:8] == PNG_MAGIC
    import matplotlib.image

    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (1200, 720)  # 2 x 2 panels at 100 dpi
    # The drawn lines are the runs' records (after a resume, the later record of a step).
    curves = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                               for line in ax.get_lines()} for ax in figures[0].axes}
    assert curves["training loss"]["run"] == series(read_metrics(a), "loss")
    assert curves["training loss"]["b/run"][0] == list(range(1, 9))
    assert curves["validation loss"]["run"] == ([5, 10], [5 * math.exp(-1) + 1.2, 5 * math.exp(-2) + 1.2])
    assert curves["learning rate"]["run"][1][-1] == pytest.approx(1e-3)
    assert curves["throughput"]["b/run"][1] == [1000.0 + s for s in range(1, 9)]


def test_hellaswag_panel_appears_when_logged(tmp_path):
    b = write_run(tmp_path / "b", hellaswag=True, val_every=5)
    result = CliRunner().invoke(cli, ["plot", str(b), "--out", str(tmp_path / "c.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.splitlines()[-1])["panels"]["hellaswag_acc_norm"] == ["b"]
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "c.png").shape[:2] == (1080, 1200)  # a third row


def test_a_resumed_run_shows_the_history_the_model_has(tmp_path):
    records = read_metrics(write_run(tmp_path / "a", resumed_from=6))
    steps, losses = series(records, "loss")
    assert steps == list(range(1, 11))
    assert losses[7] == pytest.approx(5 * math.exp(-8 / 5) + 1)  # the record logged after the resume
    assert series(records, "val_loss") == ([5, 10], [pytest.approx(5 * math.exp(-1) + 1.2),
                                                     pytest.approx(5 * math.exp(-2) + 1.2)])


def test_tokens_axis_puts_eval_records_at_the_tokens_of_their_step(tmp_path):
    records = read_metrics(write_run(tmp_path / "a", tokens_per_step=2048))
    assert series(records, "val_loss", x="tokens")[0] == [5 * 2048, 10 * 2048]


def test_plot_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")])
    assert result.exit_code != 0 and "no metrics.jsonl" in result.output and "Traceback" not in result.output
    broken = write_run(tmp_path / "broken")
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # killed mid-write: the partial last line is skipped
    assert series(read_metrics(broken), "loss")[0] == list(range(1, 11))
