"""Time-to-accuracy results: what the harness keeps of one task's runs.

From :func:`tta.run_task`'s record: the task's entry of ``results.json`` (:func:`analyse`:
steps, epochs and seconds to each target, raw and normalised clocks, ratios to SGD), the
rows of ``tta.csv`` (:func:`csv_rows`) and the loss and accuracy plots (:func:`plot`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import common
from .tta_runs import RunResult
from .tta_tasks import Task


def target_key(target: float, metric: str = "test_accuracy") -> str:
    """Label of a target in tables and result keys: ``90`` (%) or ``1.8`` (loss)."""
    return f"{int(round(100 * target))}" if metric == "test_accuracy" else f"{target:g}"


def normalised_seconds(optimizer: str, steps: float, iteration_ms: dict[str, float]) -> float:
    """Steps × per-iteration cost; mL-BFGS's first 2T steps at its warm-up cost (no pairs
    yet, so no two-loop), the rest at its full-history cost."""
    if optimizer == "mlbfgs" and "mlbfgs_warmup" in iteration_ms:
        warm = min(steps, iteration_ms["mlbfgs_warmup_steps"])
        return (warm * iteration_ms["mlbfgs_warmup"]
                + (steps - warm) * iteration_ms["mlbfgs"]) / 1e3
    return steps * iteration_ms[optimizer] / 1e3


def analyse(task_result: dict[str, Any], *, iteration_ms: dict[str, float] | None
            ) -> dict[str, Any]:
    """Per optimizer at its best lr: steps/epochs/seconds to each target, final accuracy,
    and the same-seed ratios to SGD (raw and normalised clocks)."""
    task: Task = task_result["task"]
    final: list[RunResult] = task_result["final"]
    per_opt: dict[str, Any] = {}
    by_opt: dict[str, dict[int, RunResult]] = {}
    for r in final:
        by_opt.setdefault(r.optimizer, {})[r.seed] = r
    for opt, runs in by_opt.items():
        entry: dict[str, Any] = {"lr": task_result["best_lr"][opt],
                                 "seeds": sorted(runs),
                                 "errors": {s: r.error for s, r in runs.items() if r.error}}
        entry["final_accuracy"] = common.summarize(r.final_accuracy for r in runs.values())
        entry["final_test_loss"] = common.summarize(r.final_loss for r in runs.values())
        entry["train_seconds"] = common.summarize(
            r.summary.get("train_seconds", math.nan) for r in runs.values())
        if opt == "mlbfgs":
            entry["counters"] = {s: {k: r.summary.get(k) for k in
                                     ("accepted_pairs", "rejected_pairs", "sgd_fallbacks",
                                      "skipped_steps", "last_nu", "last_gamma")}
                                 for s, r in runs.items()}
        for target in task.targets:
            key = target_key(target, task.metric)
            hits = {s: r.first_reaching(target, task.metric) for s, r in runs.items()}
            reached = {s: h for s, h in hits.items() if h is not None}
            steps = [float(h["step"]) for h in reached.values()]
            entry[f"reached_{key}"] = f"{len(reached)}/{len(runs)}"
            # Medians only over seeds that reached it; "reached" says how many did.
            entry[f"steps_to_{key}"] = common.summarize(steps)
            entry[f"epochs_to_{key}"] = common.summarize(h["epoch"] for h in reached.values())
            entry[f"seconds_to_{key}"] = common.summarize(h["time"] for h in reached.values())
            if iteration_ms and opt in iteration_ms:
                entry[f"norm_seconds_to_{key}"] = common.summarize(
                    normalised_seconds(opt, s, iteration_ms) for s in steps)
            sgd_runs = by_opt.get("sgd", {})
            norm_ratio = []
            for s, h in reached.items():
                sgd_hit = (sgd_runs[s].first_reaching(target, task.metric) if s in sgd_runs
                           else None)
                if sgd_hit is not None and iteration_ms and opt in iteration_ms:
                    norm_ratio.append(normalised_seconds(opt, h["step"], iteration_ms)
                                      / normalised_seconds("sgd", sgd_hit["step"],
                                                           iteration_ms))
            entry[f"time_ratio_to_sgd_{key}"] = common.summarize(
                _same_seed_ratios(reached, sgd_runs, target, task.metric))
            entry[f"norm_time_ratio_to_sgd_{key}"] = common.summarize(norm_ratio)
            # Against Adam too (the strongest baseline of the tables), same seed, raw clocks.
            entry[f"time_ratio_to_adam_{key}"] = common.summarize(
                _same_seed_ratios(reached, by_opt.get("adam", {}), target, task.metric))
        per_opt[opt] = entry
    return {"task": task.name, "model": task.model, "dataset": task.dataset,
            "epochs": task.epochs, "steps": task.total_steps(), "batch_size": task.batch_size,
            "warmup_steps": task.warmup_steps(), "metric": task.metric,
            "flags": {o: task.extra_flags(o) for o in per_opt},
            "eval_every": task.eval_every, "full_grid": task.full_grid,
            "swept": task.sweep, "sweep_fraction": task.sweep_fraction,
            "seeds": list(task.seeds),
            "sweep_seeds": task.sweep_seeds,
            "targets": list(task.targets),
            "lr_grid": {o: list(task.grid(o)) for o in per_opt}, "best_lr": task_result[
                "best_lr"], "per_optimizer": per_opt, "seconds": task_result["seconds"],
            "sweep": [_run_row(r) for r in task_result["sweep"]]}


def _same_seed_ratios(reached: dict[int, dict[str, float]], reference: dict[int, RunResult],
                      target: float, metric: str) -> list[float]:
    """Per seed that both reached ``target``: training seconds over the reference run's."""
    ratios = []
    for seed, hit in reached.items():
        ref_hit = (reference[seed].first_reaching(target, metric) if seed in reference
                   else None)
        if ref_hit is not None:
            ratios.append(hit["time"] / ref_hit["time"])
    return ratios


def _run_row(r: RunResult) -> dict[str, Any]:
    return {"optimizer": r.optimizer, "lr": r.lr, "seed": r.seed, "phase": r.phase,
            "final_accuracy": r.final_accuracy, "final_test_loss": r.final_loss,
            "error": r.error,
            "train_seconds": r.summary.get("train_seconds", math.nan),
            "eval_seconds": r.eval_seconds, "wall_seconds": r.wall_seconds}


def csv_rows(task_result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per run (sweep and final), for tta.csv."""
    task: Task = task_result["task"]
    rows = []
    seen = set()
    for r in task_result["sweep"] + task_result["final"]:
        if id(r) in seen:
            continue
        seen.add(id(r))
        row = {"task": task.name, **_run_row(r),
               "best_lr": r.lr == task_result["best_lr"][r.optimizer]}
        for target in task.targets:
            hit = r.first_reaching(target, task.metric)
            key = target_key(target, task.metric)
            row[f"step_{key}"] = hit["step"] if hit else ""
            row[f"epoch_{key}"] = hit["epoch"] if hit else ""
            row[f"seconds_{key}"] = hit["time"] if hit else ""
        rows.append(row)
    return rows


def plot(task_result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Loss vs steps, loss vs training seconds, test accuracy vs seconds (best lr each)."""
    plt = common.use_agg_backend()
    import numpy as np

    task: Task = task_result["task"]
    final: list[RunResult] = task_result["final"]
    by_opt: dict[str, list[RunResult]] = {}
    for r in final:
        by_opt.setdefault(r.optimizer, []).append(r)
    paths = []
    specs = [("loss_vs_steps", "train", "step", "loss", "optimizer steps", "training loss"),
             ("loss_vs_time", "train", "time", "loss", "training seconds (eval excluded)",
              "training loss"),
             ("accuracy_vs_time", "evals", "time", task.metric,
              "training seconds (eval excluded)", task.metric.replace("_", " "))]
    for name, source, xkey, ykey, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=90)
        first_values: list[float] = []
        for opt, runs in by_opt.items():
            curves = [getattr(r, source) for r in runs if getattr(r, source)]
            if not curves:
                continue
            length = min(len(c) for c in curves)
            xs = np.array([[rec[xkey] for rec in c[:length]] for c in curves])
            ys = np.array([[rec[ykey] for rec in c[:length]] for c in curves], dtype=float)
            x = np.median(xs, axis=0)
            lr = task_result["best_lr"][opt]
            line, = ax.plot(x, np.median(ys, axis=0), label=f"{opt} (lr {lr:g})", lw=1.4)
            ax.fill_between(x, ys.min(axis=0), ys.max(axis=0), color=line.get_color(),
                            alpha=0.15, lw=0)
            first_values += [v for v in ys[:, 0] if math.isfinite(v)]
        if ykey == "loss":
            ax.set_yscale("log")
            # A seed that diverged (loss 1e20 before the run stopped) would stretch the axis
            # over twenty decades and flatten every other curve: cap it at a few times the
            # largest starting loss; the diverged band leaves the plot at the top.
            if first_values:
                ax.set_ylim(top=4.0 * max(first_values))
        if ykey == task.metric:
            if task.higher_is_better:
                ax.set_ylim(min(task.targets) - 0.1, 1.0)
            else:
                ax.set_ylim(min(task.targets) - 0.2, max(task.targets) + 0.6)
            for target in task.targets:
                ax.axhline(target, color="grey", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{task.name}: {ylabel} (median of {len(task.seeds)} seeds, band "
                     "min–max)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"tta_{task.name}_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
