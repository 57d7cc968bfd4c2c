"""``mlbfgs-plot``: a PNG of real runs (mL-BFGS and SGD overlaid), with a panel for every
counter the runs logged, NaN diagnostics as gaps, and a clear error for a run without
metrics."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.mpi_helpers import PYTHON, REPO, load_module
from tests.train_runs import BASE_ARGS, run_training, train_env

try:  # installed as a package by setup.cfg (console script mlbfgs-plot); else the source tree
    from mlbfgs_hpc_tools import mlbfgs_plot
except ImportError:
    mlbfgs_plot = load_module("mlbfgs_plot", REPO / "tools" / "mlbfgs_plot.py")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.mark.timeout(300)
def test_plot_of_real_runs_is_a_png(tmp_path: Path) -> None:
    runs = []
    for optimizer in ("mlbfgs", "sgd"):
        run = tmp_path / optimizer
        code, out = run_training([*BASE_ARGS, "--threads", "1", "--optimizer", optimizer,
                                  "--steps", "40", "--update-freq", "5", "--eval-every", "10",
                                  "--log-every", "2", "--run-dir", str(run)],
                                 log=tmp_path / f"{optimizer}.log")
        assert code == 0, out[-3000:]
        runs.append(run)
    target = tmp_path / "plots" / "runs.png"
    command = shutil.which("mlbfgs-plot", path=str(Path(PYTHON).parent))
    argv = [command] if command else [PYTHON, str(REPO / "tools" / "mlbfgs_plot.py")]
    proc = subprocess.run([*argv, *map(str, runs), "-o", str(target)], capture_output=True,
                          text=True, env=train_env(), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = target.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 20_000, len(data)
    panels = proc.stdout.split("panels: ")[1].strip().split(", ")
    assert panels[:3] == ["training loss", "test accuracy", "learning rate"]
    assert {"accepted_pairs", "last_gamma", "last_nu"} <= set(panels), panels
    # The SGD run has no counters, the mL-BFGS run has: both are in the legend.
    metrics = [mlbfgs_plot.read_run(run) for run in runs]
    assert [m.name for m in metrics] == ["mlbfgs", "sgd"]
    assert metrics[0].counter_keys() and not metrics[1].counter_keys()
    assert sorted(metrics[0].evals) == [10, 20, 30, 40]
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(target).shape
    assert width == 1500 and height == 340 * math.ceil(len(panels) / 3), (width, height)


def test_panels_follow_the_logged_keys_and_nan_is_a_gap(tmp_path: Path) -> None:
    """Counters are whatever the records hold (e.g. diagnostics that may be NaN); a resumed
    run's repeated steps keep their last record; a torn last line is ignored."""
    run = tmp_path / "run"
    run.mkdir()
    lines = [{"event": "train", "step": s, "loss": 1.0 / s, "lr": 0.1, "time": 0.1 * s,
              "accuracy": 0.5, "accepted_pairs": s // 2,
              "cos_mean": float("nan") if s < 3 else 0.5} for s in (1, 2, 3, 4)]
    lines.append({"event": "train", "step": 4, "loss": 9.0, "lr": 0.1, "time": 1.0,
                  "cos_mean": 0.25, "accepted_pairs": 2})  # the resumed run's step 4
    lines.append({"event": "eval", "step": 4, "test_accuracy": 0.8})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"event": "tra'
    (run / "metrics.jsonl").write_text(text)
    metrics = mlbfgs_plot.read_run(run)
    assert metrics.counter_keys() == ["accepted_pairs", "cos_mean"]
    xs, ys = metrics.series("cos_mean")
    assert xs == [1.0, 2.0, 3.0, 4.0] and math.isnan(ys[0]) and ys[2:] == [0.5, 0.25]
    assert metrics.series("loss", x="time")[0][-1] == 1.0
    out = tmp_path / "one.png"
    assert mlbfgs_plot.main([str(run), "-o", str(out), "--names", "resumed"]) == 0
    assert out.read_bytes().startswith(PNG_SIGNATURE)
    assert mlbfgs_plot.main([str(tmp_path / "missing"), "-o", str(out)]) == 2


def test_without_matplotlib_one_line_names_the_extra(tmp_path: Path) -> None:
    """A plain install has no matplotlib: ``mlbfgs-plot`` says what to install (exit 2).
    matplotlib is hidden, not mocked: a test-only ``matplotlib`` package placed first on
    PYTHONPATH raises ImportError, as an absent one does."""
    hide = tmp_path / "hide" / "matplotlib"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text('raise ImportError("matplotlib hidden by the test")\n')
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"event": "train", "step": 1, "epoch": 0.1, "loss": 2.0, "accuracy": 0.1, "lr": 0.1,
         "time": 0.5}) + "\n")
    command = shutil.which("mlbfgs-plot", path=str(Path(PYTHON).parent))
    argv = [command] if command else [PYTHON, str(REPO / "tools" / "mlbfgs_plot.py")]
    env = train_env(PYTHONPATH=f"{hide.parent}:{REPO}")
    proc = subprocess.run([*argv, str(run), "-o", str(tmp_path / "x.png")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        'mlbfgs-plot: error: needs matplotlib, which a plain install of mlbfgs-hpc leaves out: '
        'pip install "mlbfgs-hpc[plot]"'], proc.stderr
    assert not (tmp_path / "x.png").exists()
