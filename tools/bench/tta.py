"""Time-to-accuracy: mL-BFGS against SGD-momentum, Adam, AdamW, Muon, L-BFGS and Shampoo.

Every run goes through the training driver (:class:`driver.BenchTrainer`: the real
``mlbfgs_hpc.train.Trainer``), global batch 128, cosine schedule over the run, one process
with a fixed number of torch threads, and writes the driver's ``metrics.jsonl``; the harness
only schedules runs and reads those files back.

Protocol (the same budget for every optimizer):

* **lr sweep**: 3 learning rates per optimizer (:data:`LR_GRID`: one shared grid for the
  SGD-scaled optimizers, one for Adam and AdamW, one for Muon's own lr); an optimizer whose
  grid has one lr (``--lr-grid``: pinned at a best lr found before) is not swept.
* **digits / MLP** (11 steps per epoch): the full grid, 3 lrs × 3 seeds, evaluation after
  every step; the best lr per optimizer is the one with the fewest median steps to 90 %
  (ties and "never": the highest median final accuracy).
* **Fashion-MNIST / small CNN** (469 steps per epoch, ~100× dearer per step): the sweep
  runs 2 seeds of the final run *truncated* after ``sweep_fraction`` of it (same schedule
  over ``epochs``, stopped early), the best lr is the one with the highest median test
  accuracy at that point (a diverged run counts as 0); then 3 seeds at that lr for
  ``epochs``, with a test evaluation every ``eval_every`` steps (a quarter epoch).

Time-to-accuracy is read at the first evaluation at or above the target, so its resolution
is the evaluation period. Two clocks are reported: the runs' own training seconds (eval time
excluded; noisy on a shared machine) and a *normalised* time = steps × the optimizer's
median per-iteration time measured by :mod:`overhead` in the same harness run (for
mL-BFGS its first 2T steps at the measured warm-up cost, the rest at the full-history cost).

This module is the section's entry point (the one :mod:`harness` imports): it holds the
protocol (:func:`run_task`: sweep, best lr, final seeds) and re-exports the names of
:mod:`tta_tasks` (the tasks and lr grids), :mod:`tta_runs` (running specs,
:class:`RunResult`) and :mod:`tta_analysis` (results, ``tta.csv`` rows, plots).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from .driver import OPTIMIZERS
from .tta_analysis import analyse, csv_rows, normalised_seconds, plot, target_key
from .tta_runs import RunResult, run_many
from .tta_tasks import DIGITS_TARGETS, LR_GRID, TARGETS, TASK_NAMES, Task, default_tasks

__all__ = ["TARGETS", "DIGITS_TARGETS", "LR_GRID", "TASK_NAMES", "Task", "default_tasks",
           "RunResult", "run_many", "run_task", "target_key", "normalised_seconds", "analyse",
           "csv_rows", "plot"]

logger = logging.getLogger(__name__)


def _spec(task: Task, optimizer: str, lr: float, seed: int, *, phase: str, root: Path,
          threads: int, stop_at: int | None = None) -> dict[str, Any]:
    run_dir = root / task.name / phase / f"{optimizer}_lr{lr:g}_s{seed}"
    return {"task": task.name, "optimizer": optimizer, "phase": phase, "stop_at": stop_at,
            "args": {
        "optimizer": optimizer, "model": task.model, "dataset": task.dataset, "lr": lr,
        "seed": seed, "epochs": task.epochs, "steps": task.steps, "run_dir": str(run_dir),
        "eval_every": task.eval_every, "log_every": task.log_every, "threads": threads,
        "extra": task.extra_flags(optimizer)}}


def _interleave(specs_by_opt: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Round-robin over optimizers so all of them see the same drift in machine load."""
    out = []
    longest = max(len(v) for v in specs_by_opt.values())
    for i in range(longest):
        for specs in specs_by_opt.values():
            if i < len(specs):
                out.append(specs[i])
    return out


def _steps_to(run: RunResult, target: float, metric: str = "test_accuracy") -> float:
    hit = run.first_reaching(target, metric)
    return float(hit["step"]) if hit else math.inf


def _final(run: RunResult, metric: str) -> float:
    """The run's last evaluation of ``metric``; a diverged run counts as the worst value."""
    worst = 0.0 if metric == "test_accuracy" else math.inf
    if run.error or not run.evals:
        return worst
    value = float(run.summary[metric]) if run.summary else float(run.evals[-1][metric])
    return value if math.isfinite(value) else worst


def _best_lr(task: Task, runs: list[RunResult], optimizer: str) -> float:
    by_lr: dict[float, list[RunResult]] = {}
    for r in runs:
        if r.optimizer == optimizer:
            by_lr.setdefault(r.lr, []).append(r)

    def key(lr: float) -> tuple[float, float]:
        group = by_lr[lr]
        # A diverged run (stopped on a non-finite loss) counts as the worst value, not as
        # missing.
        finals = sorted(_final(r, task.metric) for r in group)
        middle = finals[len(finals) // 2] if len(finals) % 2 else (
            finals[len(finals) // 2 - 1] + finals[len(finals) // 2]) / 2
        score = -middle if task.higher_is_better else middle
        if task.full_grid:
            steps = sorted(_steps_to(r, task.targets[-1], task.metric)
                           for r in group)[len(group) // 2]
            return (steps, score)
        return (score, 0.0)

    return min(by_lr, key=key)


def run_task(task: Task, *, root: Path, jobs: int, threads: int,
             optimizers: tuple[str, ...] = OPTIMIZERS) -> dict[str, Any]:
    """Sweep, pick the best lr per optimizer, run the seeds; return the per-run records."""
    start = time.monotonic()
    seeds = task.seeds
    sweep_seeds = seeds if task.full_grid else seeds[:task.sweep_seeds]
    # A sweep run is the final run truncated: same schedule (over the final run's length),
    # stopped after ``sweep_fraction`` of it, so the lrs are compared on exactly the first steps of
    # the runs they are chosen for (a short run with its own, faster-decaying schedule hides
    # instabilities at high lr: measured, see BENCHMARKS.md).
    stop_at = None if task.full_grid else max(1, round(task.sweep_fraction
                                                       * task.total_steps()))
    if task.sweep:
        # An optimizer with one lr in its grid (pinned, e.g. at a best lr found earlier) has
        # nothing to choose: it goes straight to the final runs.
        swept = tuple(opt for opt in optimizers if task.full_grid or len(task.grid(opt)) > 1)
        sweep_specs = _interleave({
            opt: [_spec(task, opt, lr, seed, phase="sweep", root=root, threads=threads,
                        stop_at=stop_at)
                  for seed in sweep_seeds for lr in task.grid(opt)]
            for opt in swept}) if swept else []
        sweep = run_many(sweep_specs, jobs=jobs)
        best = {opt: _best_lr(task, sweep, opt) if opt in swept else task.grid(opt)[0]
                for opt in optimizers}
    else:
        sweep = []
        best = {opt: task.grid(opt)[len(task.grid(opt)) // 2] for opt in optimizers}
    logger.info("%s: best lr per optimizer %s", task.name, best)
    if task.full_grid and task.sweep:
        final = [r for r in sweep if r.lr == best[r.optimizer]]
    else:
        final = run_many(_interleave({
            opt: [_spec(task, opt, best[opt], seed, phase="final", root=root,
                        threads=threads)
                  for seed in seeds]
            for opt in optimizers}), jobs=jobs)
    return {"task": task, "best_lr": best, "sweep": sweep, "final": final,
            "seconds": time.monotonic() - start}
