"""Time-to-accuracy runs: training runs, each in a fresh process, read back from their files.

A *spec* is one run's driver arguments (``args``, for :func:`driver.make_args`) with its
labels (``task``, ``optimizer``, ``phase``) and ``stop_at``; :func:`run_many` runs specs
``jobs`` at a time and returns what each run left in the driver's ``metrics.jsonl`` as a
:class:`RunResult`. A run that already finished is read back, not redone. Used by the
protocol of :mod:`tta` and by ``tools/sweep.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .driver import make_args, run_training

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What one training run left in its ``metrics.jsonl``.

    Args:
        optimizer: optimizer name.
        lr: learning rate.
        seed: seed of data order and initialisation.
        phase: ``"sweep"`` or ``"final"``.
        evals: the ``eval`` records (step, epoch, time, test accuracy and loss).
        train: the ``train`` records (step, time, window training loss, counters).
        summary: the ``summary`` record (empty if the run did not finish).
        error: why the run stopped early (e.g. diverged), else ``None``.
        eval_seconds: seconds spent evaluating (excluded from ``time``).
        wall_seconds: wall-clock seconds of the whole child process.
    """

    optimizer: str
    lr: float
    seed: int
    phase: str
    evals: list[dict[str, float]] = field(default_factory=list)
    train: list[dict[str, float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    eval_seconds: float = 0.0
    wall_seconds: float = 0.0

    def first_reaching(self, target: float, metric: str = "test_accuracy"
                       ) -> dict[str, float] | None:
        """The first evaluation at or beyond ``target`` (≥ for accuracy, ≤ for loss)."""
        for record in self.evals:
            value = record[metric]
            if value >= target if metric == "test_accuracy" else value <= target:
                return record
        return None

    @property
    def final_accuracy(self) -> float:
        if self.summary:
            return float(self.summary["test_accuracy"])
        return float(self.evals[-1]["test_accuracy"]) if self.evals else math.nan

    @property
    def final_loss(self) -> float:
        if self.summary:
            return float(self.summary["test_loss"])
        return float(self.evals[-1]["test_loss"]) if self.evals else math.nan


def _run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Child-process body: one training run; never raises (errors are results)."""
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("mlbfgs_hpc").setLevel(logging.WARNING)
    args = make_args(**spec["args"])
    start = time.monotonic()
    out: dict[str, Any] = {"error": None, "eval_seconds": 0.0}
    try:
        out.update(run_training(args, stop_at=spec.get("stop_at")))
    except Exception as exc:  # noqa: BLE001 - a diverged optimizer is a result, not a crash
        out["error"] = f"{type(exc).__name__}: {exc}"[:500]
    out["wall_seconds"] = time.monotonic() - start
    return out


def _read_metrics(path: Path) -> tuple[list[dict], list[dict], dict]:
    evals, train, summary = [], [], {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["event"] == "eval":
                evals.append(record)
            elif record["event"] == "train":
                train.append(record)
            elif record["event"] == "summary":
                summary = record
    return evals, train, summary


def run_many(specs: list[dict[str, Any]], *, jobs: int) -> list[RunResult]:
    """Run the specs, ``jobs`` at a time, each in a fresh process (clean state, own RNG)."""
    ctx = multiprocessing.get_context("spawn")
    results: list[RunResult | None] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        # A run that finished in an earlier (interrupted) harness run is read back, not redone.
        evals, train, summary = _read_metrics(Path(spec["args"]["run_dir"]) / "metrics.jsonl")
        if summary:
            results[i] = RunResult(
                optimizer=spec["optimizer"], lr=spec["args"]["lr"], seed=spec["args"]["seed"],
                phase=spec["phase"], evals=evals, train=train, summary=summary)
        else:
            (Path(spec["args"]["run_dir"]) / "metrics.jsonl").unlink(missing_ok=True)
            todo.append(i)
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx,
                                                max_tasks_per_child=1) as pool:
        futures = {pool.submit(_run_one, specs[i]): i for i in todo}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            i = futures[future]
            spec = specs[i]
            try:
                status = future.result()
            except Exception as exc:  # noqa: BLE001 - e.g. the child died
                status = {"error": f"worker failed: {exc}", "eval_seconds": 0.0,
                          "wall_seconds": math.nan}
            evals, train, summary = _read_metrics(Path(spec["args"]["run_dir"]) /
                                                  "metrics.jsonl")
            results[i] = RunResult(
                optimizer=spec["optimizer"], lr=spec["args"]["lr"], seed=spec["args"]["seed"],
                phase=spec["phase"], evals=evals, train=train, summary=summary,
                error=status.get("error"), eval_seconds=status.get("eval_seconds", 0.0),
                wall_seconds=status.get("wall_seconds", math.nan))
            r = results[i]
            logger.info("[%d/%d] %s %s lr=%g seed=%d: final acc %.4f%s (%.0f s)", done,
                        len(todo), spec["task"], r.optimizer, r.lr, r.seed, r.final_accuracy,
                        f" ERROR {r.error}" if r.error else "", r.wall_seconds)
    return [r for r in results if r is not None]
