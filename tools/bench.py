"""``python tools/bench.py``: the benchmark harness of mlbfgs-hpc (never part of the tests).

::

    python tools/bench.py                      # everything, ~45 min on 2 cores
    python tools/bench.py --quick              # smoke version, a few minutes
    python tools/bench.py --only overhead,bandwidth --out bench-results/
    python tools/bench.py --assets tools/benchmarks   # also copy the PNGs there

Sections (``--only``, comma-separated, run in this order):

=============  ============================================================================
overhead       whole-iteration time of mL-BFGS and the other optimizers over SGD-momentum,
               same model and batch, and the mL-BFGS step broken into its pieces
bandwidth      STREAM triad of this machine vs the two-loop recursion's achieved bandwidth
               (history 5/10/20, blocks 1e4..1e7) and the compact (matrix) form
scaling        mpirun -np 1/2/4: per-rank optimizer state and step pieces vs the ideal 1/p,
               Horovod vs mpi4py gradient backend
checkpoint     tools/bench_checkpoint.py: checkpoint size, write and read time vs disk speed
tta            time-to-accuracy (85/88/90 %) on digits/MLP and Fashion-MNIST/CNN vs SGD,
               Adam, stochastic L-BFGS and pytorch-optimizer's ScalableShampoo
=============  ============================================================================

Writes into ``--out``: ``results.json`` (everything, with the machine, versions, commands
and load averages), one CSV per section, PNG plots and ``summary.md`` (the Markdown tables
BENCHMARKS.md quotes). Every speed figure is a ratio to a baseline measured in the same run,
reported as median [first–third quartile] over repeats.
"""

from __future__ import annotations

import argparse
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

try:
    from . import bench_common as common
except ImportError:  # run as a script: python tools/bench.py
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_common as common  # type: ignore[no-redef]

from mlbfgs_hpc.config import MLBFGSConfig

logger = logging.getLogger("bench")

SECTIONS: tuple[str, ...] = ("overhead", "bandwidth", "scaling", "checkpoint", "tta")
TOOLS = Path(__file__).resolve().parent


def _sibling(name: str) -> Any:
    """Import a sibling module of tools/ both as a script and as the installed package."""
    return importlib.import_module(f"{__package__}.{name}" if __package__ else name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--fmnist-epochs", type=float, default=3.0,
                   help="epochs of the final (3-seed) Fashion-MNIST runs")
    p.add_argument("--fmnist-sweep-epochs", type=float, default=0.5,
                   help="epochs of the Fashion-MNIST lr-sweep runs (seed 0)")
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
        pngs = ((_plot_overhead(sec["overhead"], out) if "overhead" in sec else [])
                + (_plot_bandwidth(sec["bandwidth"], out) if "bandwidth" in sec else [])
                + (_sibling("bench_scaling").plot(sec["scaling"], out)
                   if "scaling" in sec else []))
        _copy_assets(args.assets, pngs + sorted(out.glob("tta_*.png")))
        logger.info("rewrote %s and %d plots", out / "summary.md", len(pngs))
        return 0
    results: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, "tools/bench.py",
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
    bench_overhead = _sibling("bench_overhead")

    res = bench_overhead.run(quick=args.quick, threads=args.threads)
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
    return res, _plot_overhead(res, out)


def _plot_overhead(res: dict[str, Any], out: Path) -> list[Path]:
    plt = common.use_agg_backend()
    configs = res["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8), dpi=90,
                             gridspec_kw={"width_ratios": [1.0, 1.25]})
    ax = axes[0]
    opts = list(configs[0]["ratio_to_sgd"])
    width = 0.8 / len(configs)
    for i, cfg in enumerate(configs):
        meds = [cfg["ratio_to_sgd"][o]["median"] for o in opts]
        lo = [m - cfg["ratio_to_sgd"][o]["q1"] for m, o in zip(meds, opts)]
        hi = [cfg["ratio_to_sgd"][o]["q3"] - m for m, o in zip(meds, opts)]
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(opts))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=cfg["label"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.1, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(opts)), opts)
    ax.set_ylabel("whole iteration / SGD (median, IQR)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    pieces = [p for p in configs[0]["breakdown_ms_per_step"] if p != "step total"]
    totals = [c["breakdown_ms_per_step"]["step total"]["median"] for c in configs]
    labels = [f"{c['label']}\nstep {t:.2f} ms\n(SGD step {c['sgd_step_ms']['median']:.2f} ms)"
              for c, t in zip(configs, totals)]
    lefts = [0.0] * len(configs)
    for piece in pieces:
        vals = [100 * c["breakdown_ms_per_step"][piece]["median"] / t
                for c, t in zip(configs, totals)]
        ax.barh(labels, vals, left=lefts, label=piece)
        lefts = [a + b for a, b in zip(lefts, vals)]
    ax.set_xlabel("share of the mL-BFGS step (%, medians)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "overhead.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def _bandwidth(args: argparse.Namespace, out: Path, results: dict[str, Any],
               earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_bandwidth = _sibling("bench_bandwidth")

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
    return res, _plot_bandwidth(res, out)


def _plot_bandwidth(res: dict[str, Any], out: Path) -> list[Path]:
    """Time per call against n, with the STREAM-kernel limit; and the fraction of it."""
    plt = common.use_agg_backend()
    model = _sibling("bench_bandwidth").stream_kernel_model_ms
    for row in res["two_loop"]:
        if "loop_model_ms" not in row:
            row.update(model(row, res["stream"]))
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.9), dpi=90)
    for m in sorted({r["history"] for r in res["two_loop"]}):
        rows = [r for r in res["two_loop"] if r["history"] == m]
        ns = [r["n"] for r in rows]
        line, = axes[0].plot(ns, [r["loop_ms"]["median"] for r in rows], "o-",
                             label=f"two-loop m={m}")
        color = line.get_color()
        axes[0].plot(ns, [r["compact_ms"]["median"] for r in rows], "s--", color=color,
                     label=f"compact m={m}")
        axes[0].plot(ns, [r["loop_model_ms"] for r in rows], ":", color=color, lw=1,
                     label=f"two-loop at STREAM rates m={m}")
        axes[1].plot(ns, [r["loop_fraction_of_model"] for r in rows], "o-", color=color,
                     label=f"two-loop m={m}")
        axes[1].plot(ns, [r["compact_fraction_of_model"] for r in rows], "s--", color=color,
                     label=f"compact m={m}")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("block size n (float32 parameters)")
    axes[0].set_ylabel("ms per H·g (incl. d ← g)")
    axes[0].legend(fontsize=6, ncol=1)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("block size n")
    axes[1].set_ylabel("STREAM-kernel time / measured time")
    st = res["stream"]
    axes[1].set_title(f"1.0 = every kernel at its large-array rate (dot "
                      f"{st['dot']['gbps']['median']:.0f}, axpy "
                      f"{st['axpy_inplace']['gbps']['median']:.0f} GB/s)", fontsize=8)
    axes[1].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "bandwidth.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]


def _scaling(args: argparse.Namespace, out: Path, results: dict[str, Any],
             earlier: dict[str, Any]) -> tuple[dict[str, Any], list[Path]]:
    bench_scaling = _sibling("bench_scaling")

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
    script = TOOLS / "bench_checkpoint.py"
    if not script.is_file():
        return {"error": "tools/bench_checkpoint.py not found (TODO: the checkpoint "
                         "benchmark)"}, []
    scratch = out / "checkpoint"
    scratch.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script), "--ranks", "1,2", "--repeats",
           "2" if args.quick else "5", "--disk-mb", "256" if args.quick else "1024",
           "--dir", str(scratch)]
    timeout_bin = shutil.which("timeout")
    if timeout_bin:
        cmd = [timeout_bin, "--kill-after=10", "900", *cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(TOOLS.parent) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=960)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}",
                "command": " ".join(cmd)}, []
    try:
        res = json.loads(proc.stdout)
    except json.JSONDecodeError:
        return {"error": "bench_checkpoint.py printed no JSON", "stdout": proc.stdout[-1500:]}, []
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
    bench_tta = _sibling("bench_tta")

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
    for task in bench_tta.default_tasks(quick=args.quick, fmnist_epochs=args.fmnist_epochs,
                                        fmnist_sweep_epochs=args.fmnist_sweep_epochs):
        task_result = bench_tta.run_task(task, root=out / "tta", jobs=args.jobs,
                                         threads=args.threads)
        res["tasks"].append(bench_tta.analyse(
            task_result, iteration_ms=iteration.get((task.model, task.dataset))))
        rows += bench_tta.csv_rows(task_result)
        pngs += bench_tta.plot(task_result, out)
        common.write_csv(out / "tta.csv", rows)
    return res, pngs


_RUNNERS = {"overhead": _overhead, "bandwidth": _bandwidth, "scaling": _scaling,
            "checkpoint": _checkpoint, "tta": _tta}


# ------------------------------------------------------------------------------- summary

def summary_markdown(results: dict[str, Any]) -> str:
    """The Markdown tables of every section that ran."""
    m = results["machine"]
    v = m["versions"]
    parts = [
        "# Benchmark summary",
        f"Command: `{results['command']}`, started {results['started']}, "
        f"{results.get('total_seconds', math.nan) / 60:.1f} min; torch threads per process: "
        f"{results['threads']}; load average (1/5/15 min) at start "
        f"{results['load_average']['start']}, at end {results['load_average'].get('end')}.",
        f"Machine: {m['cpu_model']}, {m['cpus']} CPUs ({m['cores_per_socket']} cores/socket, "
        f"{m['threads_per_core']} thread/core), L2 {m['l2_cache']}, L3 {m['l3_cache']}, "
        f"{m['memory_gib']} GiB, {m['os']}, hypervisor {m['hypervisor']}.",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None)
        + f", Python {m['python']}.",
    ]
    sec = results["sections"]
    if "overhead" in sec:
        parts.append(_md_overhead(sec["overhead"]))
    if "bandwidth" in sec:
        parts.append(_md_bandwidth(sec["bandwidth"]))
    if "scaling" in sec:
        parts.append(_md_scaling(sec["scaling"]))
    if "checkpoint" in sec:
        parts.append(_md_checkpoint(sec["checkpoint"]))
    if "tta" in sec:
        parts.append(_md_tta(sec["tta"]))
    return "\n\n".join(parts) + "\n"


def _md_overhead(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    out = ["## Per-iteration overhead"]
    for cfg in res["configs"]:
        out.append(f"### {cfg['label']} ({cfg['parameters']:,} parameters, {cfg['blocks']} "
                   f"blocks, batch {cfg['batch_size']}, history {cfg['history']}, T = "
                   f"{cfg['update_freq']}, {cfg['repeats']} windows of {cfg['window_steps']} "
                   f"steps, {cfg['threads']} thread(s))")
        out.append(common.markdown_table(
            ["optimizer", "ms / iteration", "iteration / SGD", "params finite"],
            [[o, f(cfg["iteration_ms"][o], digits=2), f(cfg["ratio_to_sgd"][o]),
              cfg["params_finite"][o]] for o in cfg["ratio_to_sgd"]]))
        total = cfg["breakdown_ms_per_step"]["step total"]["median"]
        rows = [[p, f(s, digits=3), f"{100 * s['median'] / total:.0f} %"]
                for p, s in cfg["breakdown_ms_per_step"].items() if p != "step total"]
        rows.append(["**mL-BFGS step total**", f(cfg["breakdown_ms_per_step"]["step total"],
                                                 digits=3), "100 %"])
        rows.append(["SGD step (torch.optim.SGD)", f(cfg["sgd_step_ms"], digits=3), ""])
        out.append(common.markdown_table(["mL-BFGS step piece", "ms / step", "share"], rows))
        out.append(f"mL-BFGS step / SGD step: {f(cfg['mlbfgs_step_over_sgd_step'], digits=1)};"
                   f" step share of the mL-BFGS iteration: "
                   f"{f(cfg['mlbfgs_step_share_of_iteration'], digits=2)}; pairs accepted "
                   f"{cfg['mlbfgs_counters']['accepted_pairs']}, rejected "
                   f"{cfg['mlbfgs_counters']['rejected_pairs']}.")
    return "\n\n".join(out)


def _md_bandwidth(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    st = res["stream"]
    model = _sibling("bench_bandwidth").stream_kernel_model_ms
    for row in res["two_loop"]:
        if "loop_model_ms" not in row:  # results written before the model existed
            row.update(model(row, st))
    out = ["## Memory bandwidth and the two-loop recursion",
           common.markdown_table(
               ["kernel (float32, 128 MiB arrays)", "bytes counted", "GB/s median [IQR]",
                "best"],
               [[k, f"{st[k]['bytes'] / st['n']:.0f}·n",
                 f(st[k]["gbps"], digits=2), f"{st[k]['best_gbps']:.2f}"]
                for k in ("triad", "axpy_inplace", "dot", "copy")]),
           common.markdown_table(
               ["m", "n", "two-loop ms", "kernel-bytes GB/s", "of DRAM triad",
                "history-bytes GB/s", "of DRAM triad", "of same-size triad",
                "compact ms", "compact speed-up"],
               [[r["history"], f"{r['n']:.0e}", f(r["loop_ms"], digits=3),
                 f(r["loop_gbps"], digits=1), f(r["loop_fraction_of_dram_triad"], digits=2),
                 f(r["loop_history_gbps"], digits=1),
                 f(r["loop_history_fraction_of_dram_triad"], digits=2),
                 f(r["loop_fraction_of_footprint_triad"], digits=2),
                 f(r["compact_ms"], digits=3), f(r["compact_speedup"], digits=2)]
                for r in res["two_loop"]]),
           common.markdown_table(
               ["m", "n", "two-loop ms", "STREAM-kernel model ms", "of the limit",
                "compact ms", "compact model ms", "of the limit"],
               [[r["history"], f"{r['n']:.0e}", f"{r['loop_ms']['median']:.3f}",
                 f"{r['loop_model_ms']:.3f}", f"{r['loop_fraction_of_model']:.2f}",
                 f"{r['compact_ms']['median']:.3f}", f"{r['compact_model_ms']:.3f}",
                 f"{r['compact_fraction_of_model']:.2f}"] for r in res["two_loop"]]),
           common.markdown_table(
               ["m", "n", "compact vs loop (f64)", "loop f32 vs f64", "compact f32 vs f64"],
               [[c["history"], c["n"], f"{c['rel_err_compact_vs_loop_f64']:.1e}",
                 f"{c['rel_err_loop_f32_vs_f64']:.1e}", f"{c['rel_err_compact_f32_vs_f64']:.1e}"]
                for c in res["correctness"]])]
    return "\n\n".join(out)


def _md_scaling(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    rows = []
    for s in res["configs"]:
        if "error" in s:
            rows.append([s["ranks"], s["backend"], f"error: {s['error'][:80]}"] + [""] * 7)
            continue
        rows.append([
            s["ranks"], s["backend"],
            f"{s['state_bytes_max'] / 2**20:.1f} ({s.get('ideal_state_bytes', math.nan) / 2**20:.1f})",
            f"{s.get('sharded_state_over_ideal', math.nan):.2f}",
            f(s["local_ms"], digits=1), f"{s.get('local_step_over_ideal', math.nan):.2f}",
            f(s["grad_reduce_ms"], digits=1), f(s["allgatherv_ms"], digits=1),
            f(s["fwd_bwd_ms"], digits=1), f(s["iteration_ms"], digits=1)])
    return "\n\n".join([
        f"## Scaling over ranks ({res['cores']} cores; {res['repeats']} launch(es) x "
        f"{res['timed_steps']} timed steps per configuration)",
        common.markdown_table(
            ["p", "grad backend", "state MiB/rank (ideal 1/p)", "sharded state / ideal",
             "optimizer local ms", "local / ideal", "grad allreduce wait ms",
             "Allgatherv ms", "fwd+bwd ms", "iteration ms"], rows)])


def _md_checkpoint(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"## Checkpoints\n\nnot measured: {res['error']}"
    disk = res.get("disk", {})
    rows = [[r["world_size"], f"{r['checkpoint_bytes'] / 2**20:.2f}", r.get("files"),
             f"{r['write_s'] * 1e3:.0f}", f"{r['read_s'] * 1e3:.0f}",
             f"{r['read_no_digest_s'] * 1e3:.0f}", f"{r['write_mib_per_s']:.0f}",
             f"{r.get('write_fraction_of_disk', math.nan):.2f}"]
            for r in res.get("runs", []) if r]
    return "\n\n".join([
        "## Checkpoints",
        f"Disk sequential write (+fsync) in the same run: {disk.get('mib_per_s', math.nan):.0f}"
        f" MiB/s. Command: `{res.get('command', '')}`",
        common.markdown_table(["ranks", "size MiB", "files", "write ms", "read ms",
                               "read ms (no sha256)", "write MiB/s", "of disk"], rows)])


def _md_tta(res: dict[str, Any]) -> str:
    f = common.fmt_stat
    out = ["## Time to accuracy",
           f"Normalised clock: steps × per-iteration median from the overhead section "
           f"({res.get('iteration_ms_source') or 'not available'})."]
    for t in res["tasks"]:
        if not t.get("swept", True):
            protocol = "no lr sweep (--quick: middle lr of the grid)"
        elif t["full_grid"]:
            protocol = f"full lr grid × seeds, best lr = fewest steps to {t['targets'][-1]:.0%}"
        else:
            protocol = (f"lr sweep on {t.get('sweep_seeds', 1)} seed(s) over "
                        f"{t['sweep_epochs']:g} epoch(s), best lr = highest median final "
                        "test accuracy")
        out.append(f"### {t['task']} ({t['model']} on {t['dataset']}): final runs "
                   f"{t['epochs']:g} epochs, seeds {t['seeds']}, eval every "
                   f"{t['eval_every']} steps; {protocol}")
        keys = [f"{int(round(100 * x))}" for x in t["targets"]]
        out.append(common.markdown_table(
            ["optimizer", "best lr", "final test accuracy", "final test loss",
             "train s (raw)"],
            [[opt, f"{e['lr']:g}", f(e["final_accuracy"], digits=4),
              f(e["final_test_loss"], digits=4), f(e["train_seconds"], digits=1)]
             for opt, e in t["per_optimizer"].items()]))
        rows = []
        for k in keys:
            for opt, e in t["per_optimizer"].items():
                rows.append([f"{k} %", opt, e[f"reached_{k}"], f(e[f"steps_to_{k}"], digits=0),
                             f(e[f"epochs_to_{k}"], digits=2), f(e[f"seconds_to_{k}"], digits=2),
                             f(e[f"time_ratio_to_sgd_{k}"], digits=2),
                             f(e.get(f"norm_time_ratio_to_sgd_{k}", {}), digits=2)])
        out.append(common.markdown_table(
            ["target", "optimizer", "seeds reaching", "steps", "epochs", "seconds (raw)",
             "time / SGD (raw, same seed)", "time / SGD (normalised)"], rows))
        counters = t["per_optimizer"].get("mlbfgs", {}).get("counters")
        if counters:
            nus = [c["last_nu"] for c in counters.values() if c.get("last_nu") is not None]
            gammas = [c["last_gamma"] for c in counters.values()
                      if c.get("last_gamma") is not None]
            first = next(iter(counters.values()))
            out.append(f"mL-BFGS at the end of the final runs: step-size guard ν (last step) "
                       f"{f(common.summarize(nus), digits=3)}, γ {f(common.summarize(gammas))}, "
                       f"pairs accepted {first.get('accepted_pairs')} / rejected "
                       f"{first.get('rejected_pairs')} (seed {next(iter(counters))}), SGD "
                       f"fallbacks {sum(int(c.get('sgd_fallbacks') or 0) for c in counters.values())}.")
        sweep = [r for r in t.get("sweep", []) if r.get("phase") == "sweep"]
        if sweep:
            cells: dict[tuple[str, float], list[str]] = {}
            for r in sorted(sweep, key=lambda r: (r["optimizer"], r["lr"], r["seed"])):
                cells.setdefault((r["optimizer"], r["lr"]), []).append(
                    "div" if r.get("error") else f"{r['final_accuracy']:.3f}")
            out.append(f"lr sweep, final test accuracy per seed (`div`: stopped on a "
                       f"non-finite loss; **bold**: chosen):")
            out.append(common.markdown_table(
                ["optimizer", "lr", "final test accuracy per sweep seed"],
                [[opt, f"**{lr:g}**" if lr == t["best_lr"][opt] else f"{lr:g}",
                  " / ".join(accs)] for (opt, lr), accs in cells.items()]))
    return "\n\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
