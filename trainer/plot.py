"""`plot RUN [RUN ...] --out curves.png`: training curves of one or several runs side by side.

Reads each run's metrics.jsonl (the records pretrain writes) and draws one panel per metric, one
line per run: training loss, validation loss, learning rate, throughput (tokens/s), plus HellaSwag
when any run logged it. A run that was resumed from an earlier checkpoint re-logs the steps after
that checkpoint; the later record of a step wins, so the curve shows the history the model has.
matplotlib runs on the Agg backend: no display needed.
"""
import json
from pathlib import Path

from trainer.errors import UserError

# (metrics.jsonl key, panel title, y label)
PANELS = [
    ("loss", "training loss", "loss"),
    ("val_loss", "validation loss", "loss"),
    ("lr", "learning rate", "lr"),
    ("tokens_per_s", "throughput", "tokens / s"),
]
OPTIONAL_PANELS = [("hellaswag_acc_norm", "HellaSwag", "acc_norm")]
X_AXES = {"step": "step", "tokens": "tokens seen"}


def read_metrics(run_dir) -> list[dict]:
    """The run's records, one per (step, kind), later records replacing earlier ones of the same step."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (pass a run directory written by pretrain)")
    lines = path.read_text().splitlines()
    latest = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # a run killed mid-write leaves a partial last line
            raise UserError(f"{path}:{number} is not valid JSON")
        if isinstance(record, dict) and "step" in record:
            kind = "train" if "loss" in record else tuple(sorted(k for k in record if k != "step"))
            latest[(record["step"], kind)] = record
    return sorted(latest.values(), key=lambda r: r["step"])


def series(records: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of one metric; eval records carry no token count, so it is taken from the training
    record of the same step."""
    tokens_at = {r["step"]: r["tokens"] for r in records if "tokens" in r}
    xs, ys = [], []
    for r in records:
        value = r.get(key)
        if not isinstance(value, (int, float)):
            continue
        position = r["step"] if x == "step" else tokens_at.get(r["step"])
        if position is not None:
            xs.append(position)
            ys.append(value)
    return xs, ys


def run(cfg, json_output: bool = False) -> dict:
    """`plot` (cfg: trainer.config.PlotConfig): draw the curves of the run dirs `cfg.runs` into the image
    `cfg.out`; returns {out, runs, panels: {metric: [run names]}}."""
    run_dirs, out, x = cfg.runs, cfg.out, cfg.x
    if not run_dirs:
        raise UserError("give at least one run directory")
    if x not in X_AXES:
        raise UserError(f"--x must be one of {', '.join(X_AXES)}, got {x!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = {}
    for run_dir in run_dirs:
        name = Path(run_dir).resolve().name
        while name in runs:  # two runs with the same directory name (a/run, b/run)
            name = f"{Path(run_dir).resolve().parent.name}/{name}"
        runs[name] = read_metrics(run_dir)
    panels = PANELS + [p for p in OPTIONAL_PANELS if any(p[0] in r for recs in runs.values() for r in recs)]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    drawn = {}
    for ax, (key, title, ylabel) in zip(axes.flat, panels):
        drawn[key] = []
        for name, records in runs.items():
            xs, ys = series(records, key, x)
            if xs:
                ax.plot(xs, ys, label=name, marker="o" if len(xs) < 20 else None, markersize=3)
                drawn[key].append(name)
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x])
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        ax.grid(alpha=0.3)
        if drawn[key]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center", transform=ax.transAxes, color="gray")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    result = {"out": str(out), "runs": list(runs), "x": x, "panels": drawn}
    if json_output:
        print(json.dumps(result))
    else:
        empty = [k for k, v in drawn.items() if not v]
        print(f"wrote {out}: {len(runs)} run(s), panels {', '.join(drawn)}"
              + (f" (no data for {', '.join(empty)})" if empty else ""))
    return result
