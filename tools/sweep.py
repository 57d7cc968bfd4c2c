"""Variant sweeps for the optimizer research: named flag sets × seeds, two runs side by side.

Every run goes through the benchmark driver (``bench_driver.BenchTrainer``: the real training
driver, eval time excluded from the clock, no checkpoints, stop on a non-finite loss), one torch
thread per run. Results are appended, one JSON object per run, to ``OUT/results.jsonl`` so
sweeps accumulate; ``--report`` prints a table per task from that file.

    python tools/sweep.py --out sweeps/graft --seeds 0 1 2 3 4 \\
        --variant 'kl=--optimizer mlbfgs --clip kl' --variant 'graft=--clip graft' \\
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
from bench_tta import run_many  # noqa: E402

logger = logging.getLogger("sweep")


def _spec(name: str, flags: list[str], seed: int, out: Path, stop_at: int | None
          ) -> dict[str, Any]:
    parsed = argparse.ArgumentParser(add_help=False)
    parsed.add_argument("--optimizer", default="mlbfgs")
    parsed.add_argument("--model", default="cnn")
    parsed.add_argument("--dataset", default="fashion-mnist")
    parsed.add_argument("--lr", type=float, default=None)
    parsed.add_argument("--eval-every", type=int, default=117)
    known, extra = parsed.parse_known_args(flags)
    lr = known.lr if known.lr is not None else (0.05 if known.optimizer == "sgd" else
                                                2.5e-3 if known.optimizer == "adam" else 0.1)
    run_dir = out / "runs" / f"{name}_s{seed}"
    return {"task": f"{known.model}-{known.dataset}", "optimizer": known.optimizer,
            "phase": name, "stop_at": stop_at, "args": {
                "optimizer": known.optimizer, "model": known.model, "dataset": known.dataset,
                "lr": lr, "seed": seed, "run_dir": str(run_dir),
                "eval_every": known.eval_every, "log_every": 10, "threads": 1,
                "extra": extra}}


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = shlex.split(args.common)
    specs = []
    for seed in args.seeds:   # seeds outermost: each variant sees the same machine drift
        for item in args.variant:
            name, _, flags = item.partition("=")
            specs.append(_spec(name, common + shlex.split(flags), seed, out, args.stop_at))
    results = run_many(specs, jobs=args.jobs)
    with open(out / "results.jsonl", "a", encoding="utf-8") as handle:
        for spec, r in zip(specs, results):
            handle.write(json.dumps({
                "variant": spec["phase"], "task": spec["task"], "seed": r.seed, "lr": r.lr,
                "flags": spec["args"]["extra"], "error": r.error,
                "evals": [[e["step"], e["test_accuracy"], e["test_loss"]] for e in r.evals],
                "train_seconds": (r.summary.get("train_seconds") if r.summary else None),
                "last_train": r.train[-1] if r.train else None,
                "summary": r.summary}) + "\n")
    report(out)


def _fmt(values: list[float], digits: int = 2) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "–"
    return f"{statistics.median(finite):.{digits}f}"


def report(out: Path, targets: tuple[float, ...] = (0.88, 0.89, 0.90)) -> None:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for line in (out / "results.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.setdefault((r["task"], r["variant"]), []).append(r)
    head = ("| task | variant | seeds | " + " | ".join(f"step ≥{t:.0%}" for t in targets)
            + " | final % | best % | best − final | per-seed final |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for (task, variant), runs in rows.items():
        cells = []
        for t in targets:
            steps = [next((e[0] for e in r["evals"] if e[1] >= t), math.inf) for r in runs]
            cells.append("/".join("–" if math.isinf(s) else str(s) for s in steps))
        finals = [r["evals"][-1][1] * 100 if r["evals"] and not r["error"] else 0.0
                  for r in runs]
        bests = [max(e[1] for e in r["evals"]) * 100 if r["evals"] else 0.0 for r in runs]
        drops = [b - f for b, f in zip(bests, finals)]
        print(f"| {task} | {variant} | {len(runs)} | " + " | ".join(cells)
              + f" | {_fmt(finals)} | {_fmt(bests)} | {max(drops):.2f} (max) | "
              + "/".join(f"{f:.2f}" for f in finals) + " |")


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
    args = p.parse_args()
    if args.report:
        report(Path(args.out))
    else:
        run(args)


if __name__ == "__main__":
    main()
