"""Variant sweeps for the optimizer research: named flag sets × seeds, two runs side by side.

Every run goes through the benchmark driver (``BenchTrainer``: the real training driver,
eval time excluded from the clock, no checkpoints, stop on a non-finite loss), one torch
thread per run. Each run lives in ``OUT/runs/<variant>_s<seed>/`` (its ``spec.json`` and the
driver's ``metrics.jsonl``); a run that already finished is not run again, so a sweep can be
stopped and restarted, or extended with more seeds and variants. ``--report`` prints a table
from whatever finished.

    python tools/sweep.py --out sweeps/graft --seeds 0 1 2 3 4 \\
        --variant 'kl=--clip kl' --variant 'graft=--clip graft' \\
        --common '--epochs 2 --eval-every 117'
    python tools/sweep.py --out sweeps/graft --report
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench.tta_runs import run_many  # noqa: E402

logger = logging.getLogger("sweep")

#: lr of a variant that sets none (the research sweeps' own defaults; Muon's: torch's example).
_DEFAULT_LR = {"sgd": 0.05, "adam": 2.5e-3, "adamw": 2.5e-3, "muon": 0.02}


def _spec(name: str, flags: list[str], seed: int, out: Path, stop_at: int | None
          ) -> dict[str, Any]:
    parsed = argparse.ArgumentParser(add_help=False)
    parsed.add_argument("--optimizer", default="mlbfgs")
    parsed.add_argument("--model", default="cnn")
    parsed.add_argument("--dataset", default="fashion-mnist")
    parsed.add_argument("--lr", type=float, default=None)
    parsed.add_argument("--eval-every", type=int, default=117)
    known, extra = parsed.parse_known_args(flags)
    lr = known.lr if known.lr is not None else _DEFAULT_LR.get(known.optimizer, 0.1)
    run_dir = out / "runs" / f"{name}_s{seed}"
    return {"task": f"{known.model}-{known.dataset}", "optimizer": known.optimizer,
            "phase": name, "stop_at": stop_at, "args": {
                "optimizer": known.optimizer, "model": known.model, "dataset": known.dataset,
                "lr": lr, "seed": seed, "run_dir": str(run_dir),
                "eval_every": known.eval_every, "log_every": 10, "threads": 1,
                "extra": extra}}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _finished(run_dir: Path) -> bool:
    """The run ended: to the last step (a ``summary`` record), or stopped on a non-finite
    loss (``done.json``, written when its batch of runs returns)."""
    return (run_dir / "done.json").is_file() or any(
        r["event"] == "summary" for r in _records(run_dir))


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    common = shlex.split(args.common)
    specs = []
    for seed in args.seeds:   # seeds outermost: each variant sees the same machine drift
        for item in args.variant:
            name, _, flags = item.partition("=")
            spec = _spec(name, common + shlex.split(flags), seed, out, args.stop_at)
            run_dir = Path(spec["args"]["run_dir"])
            if _finished(run_dir):
                continue
            if run_dir.exists():  # an interrupted run: start it again from scratch
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "spec.json").write_text(json.dumps(
                {"variant": name, "seed": seed, "flags": common + shlex.split(flags),
                 "task": spec["task"], "lr": spec["args"]["lr"]}), encoding="utf-8")
            specs.append(spec)
    logger.info("%d runs to do", len(specs))
    for spec, result in zip(specs, run_many(specs, jobs=args.jobs)):
        (Path(spec["args"]["run_dir"]) / "done.json").write_text(json.dumps(
            {"error": result.error, "wall_seconds": result.wall_seconds}), encoding="utf-8")
    report(out)


def _fmt(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    return f"{statistics.median(finite):.{digits}f}" if finite else "–"


def collect(out: Path) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Finished runs by (task, variant), each with its spec, evals and summary."""
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for spec_path in sorted((out / "runs").glob("*/spec.json")):
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
        if not _finished(spec_path.parent):
            continue
        records = _records(spec_path.parent)
        summary = next((r for r in records if r["event"] == "summary"), None)
        evals = [r for r in records if r["event"] == "eval"]
        rows.setdefault((spec["task"], spec["variant"]), []).append(
            {**spec, "evals": evals, "summary": summary, "diverged": summary is None})
    for runs in rows.values():
        runs.sort(key=lambda r: r["seed"])
    return rows


def report(out: Path, targets: tuple[float, ...] = (0.88, 0.89, 0.90),
           metric: str = "test_accuracy") -> None:
    higher = metric == "test_accuracy"
    scale = 100.0 if higher else 1.0
    head = ("| task | variant | seeds | " + " | ".join(
        f"step {'≥' if higher else '≤'}{t:g}" for t in targets)
            + " | final | best | worst best−final | per-seed final |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (task, variant), runs in collect(out).items():
        cells = []
        for t in targets:
            steps = [next((e["step"] for e in r["evals"]
                           if (e[metric] >= t if higher else e[metric] <= t)), math.inf)
                     for r in runs]
            cells.append("/".join("–" if math.isinf(s) else str(s) for s in steps))
        finals = [r["evals"][-1][metric] * scale if r["evals"] and not r["diverged"]
                  else (0.0 if higher else math.inf) for r in runs]
        values = [[e[metric] * scale for e in r["evals"]] for r in runs]
        bests = [(max(v) if higher else min(v)) if v else math.nan for v in values]
        drops = [abs(b - f) for b, f in zip(bests, finals)]
        print(f"| {task} | {variant} | {'/'.join(str(r['seed']) for r in runs)} | "
              + " | ".join(cells) + f" | {_fmt(finals)} | {_fmt(bests)} | "
              + f"{max(drops):.2f} | " + "/".join(f"{f:.2f}" for f in finals) + " |")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=FLAGS (mlbfgs-train flags); repeat")
    p.add_argument("--common", default="", help="flags for every variant")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--stop-at", type=int, default=None,
                   help="truncate every run after this many steps (schedule unchanged)")
    p.add_argument("--report", action="store_true", help="only print the table")
    p.add_argument("--metric", default="test_accuracy", choices=("test_accuracy", "test_loss"))
    p.add_argument("--targets", type=float, nargs="+", default=[0.88, 0.89, 0.90])
    args = p.parse_args()
    if args.report:
        report(Path(args.out), tuple(args.targets), args.metric)
    else:
        run(args)


if __name__ == "__main__":
    main()
