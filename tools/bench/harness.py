"""``python -m tools.bench``: the CPU benchmark harness of mlbfgs-hpc (never part of the tests).

::

    python -m tools.bench                      # everything, ~45 min on 2 cores
    python -m tools.bench --quick              # smoke version, a few minutes
    python -m tools.bench --only overhead,bandwidth --out bench-results/
    python -m tools.bench --assets tools/benchmarks   # also copy the PNGs there

Sections (``--only``, comma-separated, run in this order):

=============  ============================================================================
overhead       whole-iteration time of mL-BFGS and the other optimizers over SGD-momentum,
               same model and batch, and the mL-BFGS step broken into its pieces
bandwidth      STREAM triad of this machine vs the two-loop recursion's achieved bandwidth
               (history 5/10/20, blocks 1e4..1e7) and the compact (matrix) form
scaling        mpirun -np 1/2/4: per-rank optimizer state and step pieces vs the ideal 1/p,
               Horovod vs mpi4py gradient backend
checkpoint     ``checkpoint`` module: checkpoint size, write and read time vs disk speed
tta            time-to-accuracy (85/88/90 %) on digits/MLP and Fashion-MNIST/CNN vs SGD,
               Adam, AdamW, torch's Muon, stochastic L-BFGS and pytorch-optimizer's
               ScalableShampoo (``--optimizers``, ``--lr-grid``: a subset, pinned lrs)
=============  ============================================================================

Writes into ``--out``: ``results.json`` (everything, with the machine, versions, commands
and load averages), one CSV per section, PNG plots and ``summary.md`` (the Markdown tables
BENCHMARKS.md quotes). Every speed figure is a ratio to a baseline measured in the same run,
reported as median [first–third quartile] over repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mlbfgs_hpc.config import MLBFGSConfig

from . import common
from .driver import OPTIMIZERS
from .report import summary_markdown

logger = logging.getLogger("bench")

SECTIONS: tuple[str, ...] = ("overhead", "bandwidth", "scaling", "checkpoint", "tta")


def _sibling(name: str) -> Any:
    """A section's module, imported when the section runs (after OMP_NUM_THREADS is set)."""
    return importlib.import_module(f"{__package__}.{name}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="minutes-long smoke version")
    p.add_argument("--out", default="bench-results", help="output directory")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: robust on a shared machine, see "
                        "BENCHMARKS.md)")
    p.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1),
                   help="training runs in parallel in the tta section")
    p.add_argument("--tasks", default="mlp-digits,cnn-fmnist-b128",
                   help="comma-separated time-to-accuracy tasks of tools/bench/tta.py: "
                        "mlp-digits, cnn-fmnist-b128, cnn-fmnist-b1024, cnn-fmnist-b4096, "
                        "lm-pystdlib, resnet18w8-fmnist")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help="comma-separated optimizers of the tta and overhead sections (the "
                        "overhead section always times mlbfgs and sgd too)")
    p.add_argument("--lr-grid", action="append", default=[], metavar="OPT=LR[,LR...]",
                   help="the tta section's lr grid for OPT on every task selected (repeat "
                        "per optimizer); one lr pins it: no sweep, final runs at that lr")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite summary.md from an existing --out/results.json, run nothing")
    p.add_argument("--assets", default=None,
                   help="also copy the PNG plots into this directory (e.g. tools/benchmarks)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--only: unknown section(s) {unknown}; choose from {SECTIONS}")
    if args.threads < 1 or args.jobs < 1:
        raise SystemExit("--threads and --jobs must be >= 1")
    args.optimizers = tuple(o.strip() for o in args.optimizers.split(",") if o.strip())
    if not args.optimizers or set(args.optimizers) - set(OPTIMIZERS):
        raise SystemExit(f"--optimizers: choose from {','.join(OPTIMIZERS)}")
    args.lr_grid = _lr_grids(args.lr_grid)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mlbfgs_hpc").setLevel(logging.WARNING)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        (out / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
        # Plots that need only results.json (the tta plots need the runs' metrics files).
        sec = results["sections"]
        pngs = ((_sibling("overhead").plot(sec["overhead"], out) if "overhead" in sec else [])
                + (_sibling("bandwidth").plot(sec["bandwidth"], out) if "bandwidth" in sec
                   else [])
                + (_sibling("scaling").plot(sec["scaling"], out)
                   if "scaling" in sec else []))
        _copy_assets(args.assets, pngs + sorted(out.glob("tta_*.png")))
        logger.info("rewrote %s and %d plots", out / "summary.md", len(pngs))
        return 0
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "-m", "tools.bench",
                             *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick, "threads": args.threads, "jobs": args.jobs,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": common.machine_info(), "load_average": {"start": common.load_average()},
        "sections": {},
    }
    previous = out / "results.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    pngs: list[Path] = []
    t0 = time.monotonic()
    for section in SECTIONS:
        if section not in sections:
            continue
        logger.info("=== %s (load average %s)", section, common.load_average())
        load_before = common.load_average()
        start = time.monotonic()
        section_result, section_pngs = _RUNNERS[section](args, out, results, earlier)
        section_result["load_average"] = {"start": load_before, "end": common.load_average()}
        section_result["section_seconds"] = time.monotonic() - start
        results["sections"][section] = section_result
        pngs += section_pngs
        common.write_json(out / "results.json", results)
    results["load_average"]["end"] = common.load_average()
    results["total_seconds"] = time.monotonic() - t0
    common.write_json(out / "results.json", results)
    (out / "summary.md").write_text(summary_markdown(results), encoding="utf-8")
    _copy_assets(args.assets, pngs)
    logger.info("done in %.1f min: %s", results["total_seconds"] / 60, out / "summary.md")
    return 0


def _lr_grids(items: Sequence[str]) -> dict[str, tuple[float, ...]]:
    """``--lr-grid`` values (``OPT=LR[,LR...]``) as ``{optimizer: lrs}``."""
    grids: dict[str, tuple[float, ...]] = {}
    for item in items:
        name, _, values = item.partition("=")
        try:
            lrs = tuple(float(v) for v in values.split(","))
        except ValueError:
            lrs = ()
        if name not in OPTIMIZERS or not lrs or any(lr <= 0 for lr in lrs):
            raise SystemExit(f"--lr-grid {item!r}: expected OPT=LR[,LR...] with OPT one of "
                             f"{','.join(OPTIMIZERS)} and lrs > 0")
        grids[name] = lrs
    return grids


def _copy_assets(assets: str | None, pngs: list[Path]) -> None:
    if not assets:
        return
    target = Path(assets)
    target.mkdir(parents=True, exist_ok=True)
    for png in pngs:
        shutil.copy2(png, target / png.name)


# ------------------------------------------------------------------------------ sections

def _overhead(args: argparse.Namespace, out: Path, results: dict[str, Any],
              earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_overhead = _sibling("overhead")

    timed = tuple(dict.fromkeys(("mlbfgs", "sgd", *args.optimizers)))
    res = bench_overhead.run(quick=args.quick, threads=args.threads, optimizers=timed)
    rows = []
    for cfg in res["configs"]:
        for opt, stat in cfg["ratio_to_sgd"].items():
            rows.append({"config": cfg["label"], "optimizer": opt, "kind": "iteration",
                         "ms_median": cfg["iteration_ms"][opt]["median"],
                         "ms_q1": cfg["iteration_ms"][opt]["q1"],
                         "ms_q3": cfg["iteration_ms"][opt]["q3"],
                         "ratio_to_sgd_median": stat["median"], "ratio_q1": stat["q1"],
                         "ratio_q3": stat["q3"], "repeats": stat["n"]})
        for piece, stat in cfg["breakdown_ms_per_step"].items():
            rows.append({"config": cfg["label"], "optimizer": "mlbfgs",
                         "kind": f"step piece: {piece}", "ms_median": stat["median"],
                         "ms_q1": stat["q1"], "ms_q3": stat["q3"], "repeats": stat["n"]})
    common.write_csv(out / "overhead.csv", rows)
    return res, bench_overhead.plot(res, out)


def _bandwidth(args: argparse.Namespace, out: Path, results: dict[str, Any],
               earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_bandwidth = _sibling("bandwidth")

    res = bench_bandwidth.run(quick=args.quick, out_dir=out)
    rows = []
    for row in res["two_loop"]:
        flat = {"history": row["history"], "n": row["n"], "pairs": row["pairs"],
                "loop_bytes": row["loop_bytes"], "compact_bytes": row["compact_bytes"]}
        flat.update(common.stat_columns(row, (
            "loop_ms", "compact_ms", "loop_gbps", "loop_history_gbps",
            "loop_history_fraction_of_dram_triad", "compact_gbps", "triad_dram_gbps",
            "triad_footprint_gbps", "loop_fraction_of_dram_triad",
            "loop_fraction_of_footprint_triad", "compact_fraction_of_dram_triad",
            "compact_speedup")))
        rows.append(flat)
    common.write_csv(out / "bandwidth.csv", rows)
    return res, bench_bandwidth.plot(res, out)


def _scaling(args: argparse.Namespace, out: Path, results: dict[str, Any],
             earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_scaling = _sibling("scaling")

    res = bench_scaling.run(quick=args.quick, out_dir=out / "scaling")
    rows = []
    for s in res["configs"]:
        row = {k: v for k, v in s.items() if not isinstance(v, dict)}
        row.update(common.stat_columns(s, (
            "iteration_ms", "fwd_bwd_ms", "step_ms", "local_ms", "grad_reduce_ms",
            "allgatherv_ms", "scalar_allgather_ms")))
        rows.append(row)
    common.write_csv(out / "scaling.csv", rows)
    return res, bench_scaling.plot(res, out)


def _checkpoint(args: argparse.Namespace, out: Path, results: dict[str, Any],
                earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    scratch = out / "checkpoint"
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = common.module_command(
        "checkpoint", "--ranks", "1,2", "--repeats", "2" if args.quick else "5", "--disk-mb",
        "256" if args.quick else "1024", "--dir", str(scratch))
    timeout_bin = shutil.which("timeout")
    if timeout_bin:
        cmd = [timeout_bin, "--kill-after=10", "900", *cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(common.REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=960)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}",
                "command": " ".join(cmd)}, []
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": "the checkpoint benchmark printed no JSON",
                "stdout": proc.stdout[-1500:]}, []
    res["command"] = " ".join(cmd[cmd.index(sys.executable):]) if sys.executable in cmd \
        else " ".join(cmd)
    runs = [r for r in res.get("runs", []) if r]
    disk = res.get("disk", {}).get("mib_per_s", math.nan)
    for r in runs:
        r["write_fraction_of_disk"] = r.get("write_mib_per_s", math.nan) / disk
    common.write_csv(out / "checkpoint.csv", [{**r, "disk_mib_per_s": disk} for r in runs])
    return res, []


def _tta(args: argparse.Namespace, out: Path, results: dict[str, Any],
         earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_tta = _sibling("tta")

    overhead = results["sections"].get("overhead") or earlier.get("sections", {}).get(
        "overhead")
    source = ("this run" if results["sections"].get("overhead") else
              "an earlier run in the same --out" if overhead else None)
    iteration = {}
    if overhead:
        for cfg in overhead["configs"]:
            costs = {o: s["median"] for o, s in cfg["iteration_ms"].items()}
            if "mlbfgs_warmup_iteration_ms" in cfg:
                # The warm-up sample is scaled by the same-run SGD median so that a cold or
                # busy warm-up window does not skew it: warm-up cost relative to SGD.
                costs["mlbfgs_warmup"] = cfg["mlbfgs_warmup_ratio_to_sgd"] * costs["sgd"]
                # The training runs use the driver's default T, whatever T the overhead
                # section ran with (--quick uses a shorter one).
                costs["mlbfgs_warmup_steps"] = 2 * MLBFGSConfig().update_freq
            iteration[(cfg["model"], cfg["dataset"])] = costs
    res: dict[str, Any] = {"tasks": [], "iteration_ms_source": source,
                           "targets": list(bench_tta.TARGETS), "lr_grid": bench_tta.LR_GRID}
    rows: list[dict[str, Any]] = []
    pngs: list[Path] = []
    for task in bench_tta.default_tasks(quick=args.quick, names=tuple(args.tasks.split(","))):
        if args.lr_grid:
            grids = {o: task.grid(o) for o in OPTIMIZERS} | args.lr_grid
            task = dataclasses.replace(task, lr_grid=tuple(grids.items()))
        task_result = bench_tta.run_task(task, root=out / "tta", jobs=args.jobs,
                                         threads=args.threads, optimizers=args.optimizers)
        res["tasks"].append(bench_tta.analyse(
            task_result, iteration_ms=iteration.get((task.model, task.dataset))))
        rows += bench_tta.csv_rows(task_result)
        pngs += bench_tta.plot(task_result, out)
        common.write_csv(out / "tta.csv", rows)
    return res, pngs


_RUNNERS = {"overhead": _overhead, "bandwidth": _bandwidth, "scaling": _scaling,
            "checkpoint": _checkpoint, "tta": _tta}
