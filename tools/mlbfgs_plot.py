"""``mlbfgs-plot``: the picture of one or more runs, from their ``metrics.jsonl``.

::

    mlbfgs-plot runs/a runs/b -o runs.png                 # runs overlaid, named a and b
    mlbfgs-plot runs/a runs/b -o runs.png --names sgd,mlbfgs --x time
    mlbfgs-plot runs/lbfgs runs/mlbfgs -o pinn.png --x time     # rel_l2 against seconds

One panel each for the training loss, the evaluation (test accuracy of a classifier, the
relative L2 error of a PINN, ``mlbfgs-train --pde``, on a log scale), the learning rate, and
then every optimizer counter or diagnostic the runs logged (``accepted_pairs``,
``last_gamma``, ``last_nu``, ``cos_mean``, ...: whatever numeric keys the ``train`` records
hold besides the standard ones, so new counters appear without a change here), against the
step (or the training time with ``--x time``, or the closure evaluations of a PINN run with
``--x func_evals``). Undefined values (NaN) leave gaps. A run that was stopped and
resumed logs some steps twice; the later record of a step wins, which is the timeline the
run's final state comes from.

Exit codes: 0 written, 2 a run directory without metrics, a bad argument, or no matplotlib
(a plain install leaves it out: ``pip install "mlbfgs-hpc[plot]"``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What to install when matplotlib is missing (setup.cfg's extra of that name).
PLOT_EXTRA = 'pip install "mlbfgs-hpc[plot]"'
#: Keys of ``train`` records that are not optimizer counters.
STANDARD_KEYS: frozenset[str] = frozenset({"event", "step", "epoch", "loss", "accuracy", "lr",
                                           "time", "func_evals"})
#: The x axes: ``--x`` choice -> (record key, axis label); ``step`` is the record's step.
X_AXES: dict[str, tuple[str, str]] = {"step": ("step", "step"),
                                      "time": ("time", "training seconds"),
                                      "func_evals": ("func_evals", "closure evaluations")}
#: Evaluation panels: (title, eval key, log scale), shown when some run logged the key.
EVAL_PANELS: tuple[tuple[str, str, bool], ...] = (
    ("test accuracy", "test_accuracy", False), ("relative L2 error", "rel_l2", True))
#: Counters shown first when logged (the ones a look at mL-BFGS starts with); the rest follow
#: in the order the runs logged them.
FIRST_COUNTERS: tuple[str, ...] = ("accepted_pairs", "rejected_pairs", "last_nu", "last_gamma")
METRICS_NAME = "metrics.jsonl"


class MetricsError(ValueError):
    """A run directory without readable metrics."""


@dataclass(kw_only=True)
class RunMetrics:
    """The ``train`` and ``eval`` records of one run, one per step (the last one logged).

    Attributes:
        name: the label of the run in the legend.
        train: ``train`` records by step.
        evals: ``eval`` records by step.
    """

    name: str
    train: dict[int, dict[str, Any]] = field(default_factory=dict)
    evals: dict[int, dict[str, Any]] = field(default_factory=dict)

    def series(self, key: str, *, source: str = "train", x: str = "step"
               ) -> tuple[list[float], list[float]]:
        """``(xs, ys)`` of ``key`` in step order; absent or non-numeric values are NaN."""
        records = self.train if source == "train" else self.evals
        xs, ys = [], []
        for step in sorted(records):
            record = records[step]
            key_x = X_AXES[x][0]
            xs.append(float(step) if key_x == "step" else float(record.get(key_x, math.nan)))
            value = record.get(key)
            ys.append(float(value) if isinstance(value, (int, float)) and
                      not isinstance(value, bool) else math.nan)
        return xs, ys

    def counter_keys(self) -> list[str]:
        """Numeric keys of the train records other than the standard ones, first seen first."""
        keys: dict[str, None] = {}
        for record in self.train.values():
            for key, value in record.items():
                if key not in STANDARD_KEYS and isinstance(value, (int, float)) and \
                        not isinstance(value, bool):
                    keys.setdefault(key)
        return list(keys)


def read_run(run_dir: str | Path, *, name: str | None = None) -> RunMetrics:
    """Read ``run_dir/metrics.jsonl``.

    Raises:
        MetricsError: the file is missing, unreadable or holds no train record.
    """
    path = Path(run_dir) / METRICS_NAME
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise MetricsError(f"{run_dir}: no readable {METRICS_NAME} ({exc.strerror})") from None
    run = RunMetrics(name=name or Path(run_dir).resolve().name)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            # A run killed mid-write can leave a torn last line; any other is damage.
            if number == len(lines):
                continue
            raise MetricsError(f"{path}:{number}: not a JSON line") from None
        if record.get("event") == "train":
            run.train[int(record["step"])] = record
        elif record.get("event") == "eval":
            run.evals[int(record["step"])] = record
    if not run.train:
        raise MetricsError(f"{path}: no train records")
    return run


def panels(runs: Sequence[RunMetrics]) -> list[tuple[str, str, str]]:
    """``(title, source, key)`` of every panel: loss, the evaluations the runs logged (test
    accuracy; a PINN's relative L2 error), lr, then the counters any of the runs logged.
    (A run with no evaluation at all still gets the test accuracy panel, empty.)"""
    evaluated = [(title, "eval", key) for title, key, _ in EVAL_PANELS
                 if any(key in record for run in runs for record in run.evals.values())]
    out = [("training loss", "train", "loss"),
           *(evaluated or [("test accuracy", "eval", "test_accuracy")]),
           ("learning rate", "train", "lr")]
    logged: dict[str, None] = {}
    for run in runs:
        for key in run.counter_keys():
            logged.setdefault(key)
    counters = [k for k in FIRST_COUNTERS if k in logged] + \
        [k for k in logged if k not in FIRST_COUNTERS]
    return out + [(key, "train", key) for key in counters]


def plot_runs(runs: Sequence[RunMetrics], out: str | Path, *, x: str = "step",
              columns: int = 3) -> list[str]:
    """Draw the runs overlaid into ``out`` (PNG); return the panel titles."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster's login or compute node
    import matplotlib.pyplot as plt

    chosen = panels(runs)
    rows = math.ceil(len(chosen) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.4 * rows),
                             squeeze=False)
    for ax, (title, source, key) in zip(axes.flat, chosen):
        for run in runs:
            xs, ys = run.series(key, source=source, x=x)
            if any(not math.isnan(y) for y in ys):
                style = "o-" if source == "eval" else "-"
                ax.plot(xs, ys, style, label=run.name, markersize=3, linewidth=1.2)
        ax.set_title(title)
        ax.set_xlabel(X_AXES[x][1])
        ax.grid(alpha=0.3)
        log_scale = key == "loss" or any(k == key and log for _, k, log in EVAL_PANELS)
        if log_scale and all(y > 0 for run in runs
                             for y in run.series(key, source=source)[1] if not math.isnan(y)):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(chosen):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(runs), 6),
               bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [title for title, _, _ in chosen]


def _unique_names(run_dirs: Sequence[str]) -> list[str]:
    """The run directories' base names, or their paths where base names repeat."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [d if names.count(n) > 1 else n for d, n in zip(run_dirs, names)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlbfgs-plot", description="Plot the training loss, test accuracy (or a PINN's "
        "relative L2 error), lr and optimizer counters of one or more runs (their "
        "metrics.jsonl), overlaid.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("-o", "--out", required=True, metavar="FILE.png", help="output image")
    p.add_argument("--names", default=None,
                   help="comma-separated legend names, one per RUN_DIR (default: their names)")
    p.add_argument("--x", choices=tuple(X_AXES), default="step",
                   help="x axis: optimizer step, training seconds or (a PINN run's) closure "
                        "evaluations (default: step)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mlbfgs-plot``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    names = _unique_names(args.run_dirs)
    if args.names is not None:
        names = args.names.split(",")
        if len(names) != len(args.run_dirs):
            parser.error(f"--names has {len(names)} names for {len(args.run_dirs)} runs")
    try:
        runs = [read_run(d, name=n) for d, n in zip(args.run_dirs, names)]
    except MetricsError as exc:
        print(f"mlbfgs-plot: error: {exc}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401 - the one optional dependency, checked up front
    except ImportError:
        print(f"mlbfgs-plot: error: needs matplotlib, which a plain install of mlbfgs-hpc "
              f"leaves out: {PLOT_EXTRA}", file=sys.stderr)
        return 2
    titles = plot_runs(runs, args.out, x=args.x)
    print(f"wrote {args.out}: {len(runs)} run(s), panels: {', '.join(titles)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
