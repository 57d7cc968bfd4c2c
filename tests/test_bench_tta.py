"""The time-to-accuracy harness's warm-up (``tools/bench/tta.py``; pure, no training).

BENCHMARKS §1 is the comparison "with the package's defaults", so a task that does not set
its own warm-up must get exactly what ``mlbfgs-train`` would choose by itself (10 % of the
run, rounded half up), and every optimizer of the task the same one; a task that sets a
fraction (the large-batch tasks) keeps it. The table heading says which was used.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mlbfgs_hpc.options import default_warmup_steps
from tools.bench import report, tta
from tools.bench.driver import OPTIMIZERS


def _warmup_flag(flags: list[str]) -> int:
    return int(flags[flags.index("--warmup-steps") + 1])


@pytest.mark.parametrize("quick", [False, True])
def test_tasks_without_their_own_warmup_get_the_drivers_default(quick: bool) -> None:
    tasks = tta.default_tasks(quick=quick)
    defaulted = [t for t in tasks if t.warmup_fraction is None]
    assert {t.name for t in defaulted} >= {"mlp-digits", "cnn-fmnist-b128"}
    for task in defaulted:
        expected = default_warmup_steps(task.total_steps())
        assert expected > 0
        assert {_warmup_flag(task.extra_flags(o)) for o in OPTIMIZERS} == {expected}


def test_the_embedded_default_run_warms_up_as_mlbfgs_train_does() -> None:
    cnn = next(t for t in tta.default_tasks(quick=False) if t.name == "cnn-fmnist-b128")
    assert cnn.total_steps() == 936 and cnn.warmup_steps() == 94


def test_a_task_that_sets_a_fraction_keeps_it() -> None:
    task = tta.Task("t", "mlp", "digits", eval_every=1, full_grid=True, steps=400,
                    warmup_fraction=0.25)
    assert task.warmup_steps() == 100
    no_warmup = tta.Task("t", "mlp", "digits", eval_every=1, full_grid=True, steps=400,
                         warmup_fraction=0.0)
    assert _warmup_flag(no_warmup.extra_flags("sgd")) == 0


def test_report_heading_reads_old_and_new_results() -> None:
    assert report._warmup_words({"warmup_steps": 94}) == "94 steps"
    assert report._warmup_words({"warmup_fraction": 0.1}) == "0.1 of the run"
    assert report._warmup_words({"warmup_fraction": None}) == "0 of the run"
    assert report._warmup_words({}) == "0 of the run"


def test_a_diverged_seed_does_not_stretch_the_loss_plot(tmp_path, monkeypatch) -> None:
    """§1's CNN plot (2026-12-03): torch L-BFGS's seed 2 reached a loss of 1e20 before the
    run stopped, and the log axis spanned twenty decades, every other curve a flat line."""
    import matplotlib.figure

    limits: dict[str, tuple[float, float]] = {}
    original = matplotlib.figure.Figure.savefig

    def recording_savefig(fig, path, *args, **kwargs):  # type: ignore[no-untyped-def]
        limits[Path(path).name] = fig.axes[0].get_ylim()
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
    task = tta.Task("t", "mlp", "digits", eval_every=10, full_grid=False, steps=30,
                    seeds=(0, 1))

    def run(optimizer: str, seed: int, losses: list[float]) -> tta.RunResult:
        train = [{"step": 10 * (i + 1), "time": float(i + 1), "loss": v}
                 for i, v in enumerate(losses)]
        evals = [{"step": r["step"], "time": r["time"], "test_accuracy": 0.9}
                 for r in train]
        return tta.RunResult(optimizer=optimizer, lr=0.1, seed=seed, phase="final",
                             evals=evals, train=train)

    final = [run("sgd", 0, [2.3, 0.5, 0.3]), run("sgd", 1, [2.3, 0.6, 0.3]),
             run("lbfgs", 0, [2.3, 1e20, 1e21]), run("lbfgs", 1, [2.3, 2.0, 1.5])]
    paths = tta.plot({"task": task, "best_lr": {"sgd": 0.1, "lbfgs": 0.1},
                      "final": final}, tmp_path)
    assert all(p.is_file() for p in paths)
    low, high = limits["tta_t_loss_vs_steps.png"]
    assert high == pytest.approx(4 * 2.3) and 0 < low < 0.3


def test_muon_runs_get_the_tasks_adamw_half_lr() -> None:
    tasks = {t.name: t for t in tta.default_tasks(quick=False)}
    flags = tasks["cnn-fmnist-b128"].extra_flags("muon")
    assert flags[flags.index("--muon-adamw-lr") + 1] == "0.008"
    lm = tasks["lm-pystdlib"].extra_flags("muon")
    assert lm[lm.index("--muon-adamw-lr") + 1] == "0.01" and "--depth" in lm
    assert "--muon-adamw-lr" not in tasks["cnn-fmnist-b128"].extra_flags("adamw")
    digits = tasks["mlp-digits"].extra_flags("muon")  # no pinned value: Adam's middle lr
    assert digits[digits.index("--muon-adamw-lr") + 1] == repr(tasks["mlp-digits"].grid(
        "adam")[1])


def test_lr_grid_option_parses_and_rejects() -> None:
    from tools.bench import harness

    assert harness._lr_grids(["sgd=0.05", "muon=0.02,0.05"]) == {"sgd": (0.05,),
                                                                 "muon": (0.02, 0.05)}
    for bad in ("sgd", "nope=0.1", "sgd=x", "sgd=-1"):
        with pytest.raises(SystemExit):
            harness._lr_grids([bad])


@pytest.mark.timeout(300)
def test_a_pinned_optimizer_is_not_swept(tmp_path: Path) -> None:
    """Real (tiny) training runs through the harness: SGD pinned at one lr goes straight to
    its final run; Muon's two lrs are swept first."""
    task = tta.Task("tiny", "mlp", "digits", steps=4, eval_every=2, full_grid=False,
                    seeds=(0,), lr_grid=(("sgd", (0.05,)), ("muon", (0.02, 0.05))))
    result = tta.run_task(task, root=tmp_path, jobs=2, threads=1, optimizers=("sgd", "muon"))
    assert sorted((r.optimizer, r.lr) for r in result["sweep"]) == [("muon", 0.02),
                                                                    ("muon", 0.05)]
    assert result["best_lr"]["sgd"] == 0.05 and result["best_lr"]["muon"] in (0.02, 0.05)
    assert sorted(r.optimizer for r in result["final"]) == ["muon", "sgd"]
    assert all(r.error is None and r.summary for r in result["final"]), result["final"]


def test_time_to_target_is_compared_with_sgd_and_adam_on_the_same_seed() -> None:
    task = tta.Task("t", "mlp", "digits", eval_every=10, full_grid=False, steps=30,
                    seeds=(0, 1), targets=(0.8,))

    def run(optimizer: str, seed: int, seconds_to_target: float) -> tta.RunResult:
        evals = [{"step": 10, "epoch": 1.0, "time": seconds_to_target / 2,
                  "test_accuracy": 0.5, "test_loss": 1.0},
                 {"step": 20, "epoch": 2.0, "time": seconds_to_target, "test_accuracy": 0.85,
                  "test_loss": 0.5}]
        return tta.RunResult(optimizer=optimizer, lr=0.1, seed=seed, phase="final",
                             evals=evals, summary={"test_accuracy": 0.85, "test_loss": 0.5,
                                                   "train_seconds": seconds_to_target})

    final = [run("sgd", 0, 10.0), run("sgd", 1, 20.0), run("adam", 0, 5.0),
             run("adam", 1, 8.0), run("muon", 0, 4.0), run("muon", 1, 10.0)]
    result = tta.analyse({"task": task, "best_lr": {"sgd": 0.1, "adam": 0.1, "muon": 0.1},
                          "final": final, "sweep": [], "seconds": 1.0}, iteration_ms=None)
    muon = result["per_optimizer"]["muon"]
    assert (muon["time_ratio_to_sgd_80"]["min"], muon["time_ratio_to_sgd_80"]["max"]) == (
        0.4, 0.5)
    assert (muon["time_ratio_to_adam_80"]["min"], muon["time_ratio_to_adam_80"]["max"]) == (
        0.8, 1.25)
    assert result["per_optimizer"]["adam"]["time_ratio_to_adam_80"]["median"] == 1.0
