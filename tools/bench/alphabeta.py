"""A latency-bandwidth (alpha-beta) model of the collectives, fitted on rate-limited links, and
its projection of the old and new gradient/update paths to 8-1,024 ranks.

Measure (root; builds and removes a 2-host ``tools/netns`` cluster with shaped links)::

    python -m tools.bench alphabeta measure [--rate 1gbit] --json ab.json

times every collective the two paths use, called through :mod:`mlbfgs_hpc.comm` exactly as
the optimizer calls it, for float32 vectors of 2^8 to 2^24 elements, in three layouts: 2 hosts
x 1 rank (network only), 1 host x 2 ranks (shared memory only) and 2 hosts x 2 ranks (both),
with the bytes each host puts on its cable per call (``eth0`` counters).

Fit: with one rank per host, an ``Allgatherv`` of two ranks is a single exchange, so its time
is ``T = alpha + B * beta`` with ``B`` the measured bytes per host: least squares over the
sizes, each weighted by ``1/T^2`` (relative errors: the sizes span five decades, and plain
least squares lets the largest one set the intercept, which came out negative), gives
``alpha`` (latency per message, software included) and ``beta`` (seconds per byte on the
cable). The same on one host gives ``alpha_shm``, ``beta_shm``. The fit is then checked
against every other measured collective (predicted vs measured).

Project::

    python -m tools.bench alphabeta project ab.json [--markdown t.md] [--plot p.png]

Model of one step (all collectives of float32 elements, ``n`` parameters, ``p`` ranks, ``L``
per host, ``H = p / L`` hosts, ring algorithms, each step limited by its slowest link):

* old path (flat): ring allreduce ``2(p-1)(alpha + 4n/p beta)`` + ring Allgatherv
  ``(p-1)(alpha + 4n/p beta)``, where a ring step costs its slowest link's ``alpha`` and
  ``beta`` (the cable's, or shared memory's where that is slower; one host: shared memory);
* new path (node-aware; one host: flat reduce-scatter + Allgatherv): intra-host reduce ``log2(L) alpha_shm + 4n beta_shm`` (pipelined),
  leaders' ring reduce-scatter ``(H-1)(alpha + 4n/H beta)``, intra-host scatter
  ``log2(L) alpha_shm + 4n/H beta_shm``; update: the same three in reverse (gather, leaders'
  ring Allgatherv, intra-host broadcast ``log2(L) alpha_shm + 4n beta_shm``).

The worker is ``python -m tools.bench alphabeta worker --out FILE`` under ``mpirun``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import common

logger = logging.getLogger(__name__)

#: name: (ranks, host indices, extra mpirun args)
LAYOUTS: dict[str, tuple[int, list[int], list[str]]] = {
    "2x1": (2, [0, 1], ["--map-by", "node"]),
    "1x2": (2, [0], []),
    "2x2": (4, [0, 1], []),
}
OPS = ("allreduce", "reduce_scatter", "node_reduce_scatter", "allgatherv", "node_allgatherv")
SIZES = tuple(2 ** k for k in (8, 12, 16, 18, 20, 22, 24))
_TIMEOUT_S = 1500


# ---- worker --------------------------------------------------------------------------------
def worker(*, sizes: Sequence[int], budget_s: float, out: Path) -> None:
    """Time each collective for each size; rank 0 writes one JSON line per (op, size)."""
    import torch

    from mlbfgs_hpc import init_communicator

    torch.set_num_threads(1)
    comm = init_communicator()
    p = comm.size
    records = []
    for n in sizes:
        counts = [n * (r + 1) // p - n * r // p for r in range(p)]
        offsets = [n * r // p for r in range(p)]
        plan = comm.node_plan(counts, offsets)
        full = torch.randn(n)
        packed = torch.randn(n)
        owned = torch.empty(counts[comm.rank])
        ops: dict[str, Callable[[], None]] = {
            "allreduce": lambda: comm.allreduce_sum_(full),
            "reduce_scatter": lambda: comm.reduce_scatter_sum_(full, owned, counts),
            "node_reduce_scatter": lambda: comm.node_reduce_scatter_sum_(packed, owned, plan),
            "allgatherv": lambda: comm.allgatherv_(full, counts, offsets),
            "node_allgatherv": lambda: comm.allgatherv_(full, counts, offsets, node_aware=True),
        }
        for name, op in ops.items():
            op()  # warm-up (connections, buffers)
            comm.barrier()
            start = time.perf_counter()
            op()
            comm.barrier()
            once = comm.broadcast_object(time.perf_counter() - start)
            iters = int(max(3, min(30, budget_s / max(once, 1e-6))))
            slowest, per_host = common.time_collective(comm, op, iters=iters)
            records.append({"op": name, "n": n, "ranks": p, "hosts": comm.layout.hosts,
                            "iters": iters, "times": slowest,
                            "median_s": sorted(slowest)[len(slowest) // 2],
                            "bytes_per_host": per_host})
    if comm.rank == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---- measure -------------------------------------------------------------------------------
def measure(*, rate: str, layouts: Sequence[str], sizes: Sequence[int], budget_s: float,
            prefix: str) -> dict[str, Any]:
    from .. import netns

    env = common.mpi_env()
    records: list[dict[str, Any]] = []
    cluster = netns.NetnsCluster(hosts=2, slots=2, prefix=prefix,
                                 link_rate=None if rate == "none" else rate).up()
    probe = netns.shaping.probe_throughput(cluster, src=0, dst=1, nbytes=16 << 20)
    try:
        with tempfile.TemporaryDirectory(prefix="bench-alphabeta-") as tmp:
            for layout in layouts:
                np_, hosts, extra = LAYOUTS[layout]
                out = Path(tmp) / f"{layout}.jsonl"
                argv = cluster.mpirun_cmd(
                    np_, common.module_command(
                        "alphabeta", "worker", "--out", str(out), "--budget", str(budget_s),
                        "--sizes", *map(str, sizes)),
                    hosts=hosts, extra_args=extra, forward=["PYTHONPATH"],
                    timeout_s=_TIMEOUT_S - 30)
                logger.info("layout %s", layout)
                proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                      timeout=_TIMEOUT_S)
                if proc.returncode != 0 or not out.exists():
                    raise RuntimeError(f"layout {layout} failed (rc={proc.returncode}):\n"
                                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                records += [{"layout": layout, **json.loads(line)}
                            for line in out.read_text().splitlines()]
    finally:
        cluster.down()
    return {"rate": rate, "probe_bits_per_s": probe, "records": records,
            "load_average": common.load_average(), "date": time.strftime("%Y-%m-%d %H:%M")}


# ---- fit -----------------------------------------------------------------------------------
def fit_line(xs: Sequence[float], ys: Sequence[float],
             weights: Sequence[float] | None = None) -> tuple[float, float]:
    """Weighted least-squares ``y = a + b x`` (``a``, ``b``); equal weights by default."""
    ws = [1.0] * len(xs) if weights is None else list(weights)
    total = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / total
    my = sum(w * y for w, y in zip(ws, ys)) / total
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs))
    b = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sxx
    return my - b * mx, b


def fit_relative(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """``y = a + b x`` minimising the relative residuals ``(y - a - b x) / y``."""
    return fit_line(xs, ys, [1.0 / (y * y) for y in ys])


def fit(data: dict[str, Any]) -> dict[str, float]:
    """alpha, beta (cable, from 2x1) and alpha_shm, beta_shm (1x2) of the Allgatherv."""
    recs = data["records"]
    net = [r for r in recs if r["layout"] == "2x1" and r["op"] == "allgatherv"]
    shm = [r for r in recs if r["layout"] == "1x2" and r["op"] == "allgatherv"]
    alpha, beta = fit_relative([max(r["bytes_per_host"]) for r in net],
                               [r["median_s"] for r in net])
    # One host: nothing on a cable; each rank copies in the other's half (4n/2 bytes).
    alpha_shm, beta_shm = fit_relative([2.0 * r["n"] for r in shm],
                                       [r["median_s"] for r in shm])
    link = _rate_bits(data["rate"])
    return {"alpha": alpha, "beta": beta, "alpha_shm": alpha_shm, "beta_shm": beta_shm,
            "link_bits_per_s": link,
            # bits per second reached on the cable (8 / beta) over the link's rate
            "efficiency": (8.0 / beta) / link if link else math.nan}


def _rate_bits(rate: str) -> float:
    if rate == "none":
        return math.nan
    from ..netns.shaping import parse_rate

    return parse_rate(rate)


def predict(op: str, *, n: int, p: int, per_host: int, k: dict[str, float]) -> float:
    """Model time of one collective (see the module docstring)."""
    a, b, a_s, b_s = k["alpha"], k["beta"], k["alpha_shm"], k["beta_shm"]
    hosts = p // per_host
    lg = math.log2(per_host) if per_host > 1 else 0.0
    # A flat ring step moves a chunk over every link at once: it takes as long as the slowest
    # one (the cable, or shared memory when it is the slower: fast networks, several ranks).
    if hosts == 1:
        step_a, step_b = a_s, b_s
    elif per_host == 1:
        step_a, step_b = a, b
    else:
        step_a, step_b = max(a, a_s), max(b, b_s)

    def net_ring(steps: int, parts: int) -> float:
        return steps * (step_a + 4.0 * n / parts * step_b)

    intra_full = lg * a_s + (4.0 * n * b_s if per_host > 1 else 0.0)
    intra_share = lg * a_s + (4.0 * n / hosts * b_s if per_host > 1 else 0.0)
    if op == "allreduce":
        return net_ring(2 * (p - 1), p)
    if op in ("allgatherv", "reduce_scatter"):
        return net_ring(p - 1, p)
    if op == "node_reduce_scatter":
        return intra_full + (hosts - 1) * (a + 4.0 * n / hosts * b) + intra_share
    if op == "node_allgatherv":
        return intra_share + (hosts - 1) * (a + 4.0 * n / hosts * b) + intra_full
    raise ValueError(op)


def check(data: dict[str, Any], k: dict[str, float]) -> list[dict[str, Any]]:
    """Predicted vs measured for the 2x2 layout and the larger sizes."""
    rows = []
    for r in data["records"]:
        if r["layout"] != "2x2" or r["n"] < 2 ** 18:
            continue
        model = predict(r["op"], n=r["n"], p=4, per_host=2, k=k)
        rows.append({"op": r["op"], "n": r["n"], "measured_s": r["median_s"],
                     "model_s": model, "bytes_x": max(r["bytes_per_host"]) / (4 * r["n"])})
    return rows


# ---- project -------------------------------------------------------------------------------
#: Assumptions of the projection (stated in BENCHMARKS.md).
N_PARAMS = 25_600_000                    # ResNet-50
RANKS_PER_HOST = 8
RANKS = (8, 16, 32, 64, 128, 256, 512, 1024)
RATES_GBIT = (25, 100)
COMPUTE_S = 0.090   # forward+backward of 32 images on one V100-class GPU (fp32)


def project(k: dict[str, float], *, alpha: float | None = None) -> list[dict[str, Any]]:
    """Comm time, iteration time and comm share, old vs new (and the default's speed-up),
    per (rate, ranks)."""
    rows = []
    for gbit in RATES_GBIT:
        kk = dict(k)
        # Same efficiency (fraction of the line rate reached) as measured, on a faster link.
        kk["beta"] = k["beta"] * k["link_bits_per_s"] / (gbit * 1e9)
        if alpha is not None:
            kk["alpha"] = alpha
        for p in RANKS:
            per_host = min(RANKS_PER_HOST, p)
            kw = {"n": N_PARAMS, "p": p, "per_host": per_host, "k": kk}
            old = predict("allreduce", **kw) + predict("allgatherv", **kw)
            # --node-aware auto: the node-aware collectives only when there are 2+ hosts.
            node = p > per_host
            update = predict("node_allgatherv" if node else "allgatherv", **kw)
            new = predict("node_reduce_scatter" if node else "reduce_scatter", **kw) + update
            # The default: allreduce + the (node-aware) Allgatherv.
            default = predict("allreduce", **kw) + update
            rows.append({"gbit": gbit, "ranks": p, "hosts": p // per_host,
                         "old_comm_s": old, "new_comm_s": new, "default_comm_s": default,
                         "default_iter_s": COMPUTE_S + default,
                         "default_speedup": (COMPUTE_S + old) / (COMPUTE_S + default),
                         "old_iter_s": COMPUTE_S + old, "new_iter_s": COMPUTE_S + new,
                         "old_share": old / (COMPUTE_S + old),
                         "new_share": new / (COMPUTE_S + new),
                         "speedup": (COMPUTE_S + old) / (COMPUTE_S + new)})
    return rows


def markdown(k: dict[str, float], checks: Sequence[dict[str, Any]],
             rows: Sequence[dict[str, Any]], rows_low_alpha: Sequence[dict[str, Any]]) -> str:
    out = [f"Fitted: alpha = {1e6 * k['alpha']:.0f} us, beta = {1e9 * k['beta']:.2f} ns/B "
           f"({8 / k['beta'] / 1e6:.0f} Mbit/s = {100 * k['efficiency']:.0f} % of the "
           f"link); alpha_shm = {1e6 * k['alpha_shm']:.0f} us, beta_shm = "
           f"{1e9 * k['beta_shm']:.3f} ns/B ({1 / k['beta_shm'] / 1e9:.2f} GB/s).", "",
           "| collective (2 hosts x 2) | elements | bytes/host (x vector) | measured ms | "
           "model ms |", "|---|---|---|---|---|"]
    for c in checks:
        out.append(f"| {c['op']} | {c['n']:,} | {c['bytes_x']:.2f} | "
                   f"{1e3 * c['measured_s']:.1f} | {1e3 * c['model_s']:.1f} |")
    out += ["", "| link | ranks (hosts) | comm old ms | comm new ms | iteration old ms | "
            "iteration new ms | comm share old | new | speed-up | (alpha = 5 us: speed-up) | "
            "default (allreduce + node-aware Allgatherv): speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r, lo in zip(rows, rows_low_alpha):
        out.append(f"| {r['gbit']} Gbit/s | {r['ranks']} ({r['hosts']}) | "
                   f"{1e3 * r['old_comm_s']:.0f} | {1e3 * r['new_comm_s']:.0f} | "
                   f"{1e3 * r['old_iter_s']:.0f} | {1e3 * r['new_iter_s']:.0f} | "
                   f"{100 * r['old_share']:.0f} % | {100 * r['new_share']:.0f} % | "
                   f"{r['speedup']:.2f} | {lo['speedup']:.2f} | "
                   f"{r['default_speedup']:.2f} |")
    return "\n".join(out) + "\n"


def plot(rows: Sequence[dict[str, Any]], rows_low_alpha: Sequence[dict[str, Any]],
         path: Path) -> None:
    plt = common.use_agg_backend()
    fig, axes = plt.subplots(1, len(RATES_GBIT), figsize=(11, 4), sharey=True)
    for ax, gbit in zip(axes, RATES_GBIT):
        for data, style, label in ((rows, "-", "fitted alpha"), (rows_low_alpha, "--",
                                                                 "alpha = 5 us")):
            sel = [r for r in data if r["gbit"] == gbit]
            ranks = [r["ranks"] for r in sel]
            ax.plot(ranks, [1e3 * r["old_iter_s"] for r in sel], "C3" + style, marker="o",
                    label=f"old (allreduce + flat Allgatherv), {label}")
            ax.plot(ranks, [1e3 * r["new_iter_s"] for r in sel], "C0" + style, marker="s",
                    label=f"new (node-aware reduce-scatter + Allgatherv), {label}")
        sel = [r for r in rows if r["gbit"] == gbit]
        ax.plot([r["ranks"] for r in sel], [1e3 * r["default_iter_s"] for r in sel], "C2-",
                marker="^", label="default (allreduce + node-aware Allgatherv), fitted alpha")
        ax.axhline(1e3 * COMPUTE_S, color="grey", lw=0.8, ls=":", label="compute alone")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("ranks (8 per host)")
        ax.set_title(f"ResNet-50 size (25.6 M params), {gbit} Gbit/s")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("iteration time, ms (model)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench alphabeta",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    w = sub.add_parser("worker")
    w.add_argument("--out", required=True)
    w.add_argument("--budget", type=float, default=2.0, help="seconds per (op, size)")
    w.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    m = sub.add_parser("measure")
    m.add_argument("--rate", default="1gbit")
    m.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    m.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    m.add_argument("--budget", type=float, default=2.0)
    m.add_argument("--json", required=True)
    m.add_argument("--prefix", default="mlbab")
    j = sub.add_parser("project")
    j.add_argument("data")
    j.add_argument("--markdown", default=None)
    j.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.mode == "worker":
        worker(sizes=args.sizes, budget_s=args.budget, out=Path(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.mode == "measure":
        import signal

        for sig in (signal.SIGTERM, signal.SIGHUP):  # so the cluster is always removed
            signal.signal(sig, signal.default_int_handler)
        data = measure(rate=args.rate, layouts=args.layouts, sizes=args.sizes,
                       budget_s=args.budget, prefix=args.prefix)
        common.write_json(Path(args.json), data)
        return 0
    data = json.loads(Path(args.data).read_text())
    k = fit(data)
    rows, low = project(k), project(k, alpha=5e-6)
    table = markdown(k, check(data, k), rows, low)
    sys.stdout.write(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.plot:
        plot(rows, low, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
