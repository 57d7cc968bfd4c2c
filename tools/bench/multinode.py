"""Cross-host communication cost of one mL-BFGS step: 2 hosts over TCP vs 1 host.

Every training step communicates twice: the gradient allreduce (Horovod, or one flat
``mpi4py`` Allreduce) and the Allgatherv that assembles the update vector from the slices
each rank owns. This benchmark times exactly those two operations, as the package issues them
(``GradientReducer.synchronize`` with every gradient pending, ``Communicator.allgatherv_`` with
the optimizer's ownership table), on model-sized buffers, and counts the bytes that cross the
cable between the hosts (the ``eth0`` counters of each namespace host: shared-memory and
loopback traffic never appear there).

Layouts, all on a ``tools/netns_cluster.py`` cluster of 2 hosts x 2 slots:

* ``2 hosts x 1``: 2 ranks, one per host: every byte goes over TCP.
* ``1 host x 2``: 2 ranks on host 0: shared memory (vader) only.
* ``2 hosts x 2``: 4 ranks, 2 per host: shared memory inside a host, TCP between them.
* ``1 host x 4``: 4 ranks on host 0 (oversubscribed).

All "hosts" share this machine's cores and the "cable" is a veth pair: absolute times say
little about a real network, the ratios (TCP vs shared memory, bytes vs model size) do.

Usage (root)::

    python -m tools.bench multinode [--models cnn resnet18] [--iters 20] \\
        [--markdown out.md] [--json out.json]

The same file is the per-rank worker (``... worker --out FILE``, started by mpirun).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import common

logger = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("mlp", "cnn", "resnet18")
# name: (ranks, hosts, extra mpirun args): --map-by node puts 1 rank on each host.
LAYOUTS: dict[str, tuple[int, list[int], list[str]]] = {
    "2 hosts x 1": (2, [0, 1], ["--map-by", "node"]),
    "1 host x 2": (2, [0], []),
    "2 hosts x 2": (4, [0, 1], []),
    "1 host x 4": (4, [0], []),
}
_RUN_TIMEOUT_S = 600


# ---- worker (one per rank, under mpirun) ------------------------------------------------------
def _timed(comm: Any, fn: Any, *, iters: int, warmup: int) -> tuple[list[float], int]:
    """Seconds per call of ``fn`` (the slowest rank's, between barriers) and eth0 bytes sent
    by all hosts during the timed calls (each host counted once, by its local rank 0)."""
    for _ in range(warmup):
        fn()
    times, per_host = common.time_collective(comm, fn, iters=iters)
    return times, round(sum(per_host) * iters)


def worker(models: Sequence[str], *, iters: int, warmup: int, out: Path) -> None:
    """Benchmark the two collectives for each model; rank 0 writes one JSON line per model."""
    import torch

    from mlbfgs_hpc import Ownership, build_blocks, init_communicator
    from mlbfgs_hpc.models import build_model

    torch.set_num_threads(1)
    comm = init_communicator()
    results = []
    for name in models:
        torch.manual_seed(0)
        model = build_model(name, in_shape=(1, 28, 28), num_classes=10)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        numel = sum(p.numel() for _, p in named)
        blocks = build_blocks(model)
        ownership = Ownership.build(block_numels=[b.numel for b in blocks],
                                    world_size=comm.size)
        flat = torch.randn(numel)
        record: dict[str, Any] = {
            "model": name, "params": numel, "model_bytes": numel * 4, "ranks": comm.size,
            "hosts": len(set(comm.allgather_object(comm.hostname))), "iters": iters}
        for backend in ("horovod", "mpi"):
            reducer = comm.gradient_reducer(named, backend=backend)

            def allreduce(reducer: Any = reducer, named: Any = named) -> None:
                # Fresh gradients, all pending: synchronize() launches and waits for them all
                # (in training, Horovod launches most of them during backward already).
                for _, p in named:
                    p.grad = torch.ones_like(p)
                reducer.synchronize()

            times, sent = _timed(comm, allreduce, iters=iters, warmup=warmup)
            reducer.remove_hooks()
            record[f"allreduce_{backend}_s"] = statistics.median(times)
            record[f"allreduce_{backend}_min_s"] = min(times)
            record[f"allreduce_{backend}_bytes"] = sent / iters
        def allgatherv(flat: Any = flat, ownership: Any = ownership) -> None:
            comm.allgatherv_(flat, ownership.counts, ownership.offsets)

        times, sent = _timed(comm, allgatherv, iters=iters, warmup=warmup)
        record["allgatherv_s"] = statistics.median(times)
        record["allgatherv_min_s"] = min(times)
        record["allgatherv_bytes"] = sent / iters
        results.append(record)
    if comm.rank == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in results))


# ---- driver ---------------------------------------------------------------------------------
def _load_cluster_module() -> Any:
    from .. import netns  # tools/netns: the namespace cluster

    return netns


def run_layouts(cluster: Any, *, models: Sequence[str], iters: int, warmup: int,
                layouts: Sequence[str]) -> list[dict[str, Any]]:
    """Run the worker in each layout on ``cluster``; every model's record, tagged by layout."""
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(common.REPO), os.environ.get("PYTHONPATH", "")])}
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        for layout in layouts:
            np, hosts, extra = LAYOUTS[layout]
            out = Path(tmp) / f"{len(records)}.jsonl"
            argv = cluster.mpirun_cmd(
                np, common.module_command("multinode", "worker", "--out", str(out),
                                          "--iters", str(iters), "--warmup", str(warmup),
                                          "--models", *models),
                hosts=hosts, extra_args=extra, oversubscribe=np > len(hosts) * cluster.slots,
                forward=["PYTHONPATH"], timeout_s=_RUN_TIMEOUT_S - 30)
            logger.info("layout %s: %d ranks on host(s) %s", layout, np, hosts)
            start = time.monotonic()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True,
                                  timeout=_RUN_TIMEOUT_S)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"layout {layout} failed (rc={proc.returncode}):\n"
                                   f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            logger.info("layout %s done in %.1f s", layout, time.monotonic() - start)
            for line in out.read_text().splitlines():
                records.append({"layout": layout, **json.loads(line)})
    return records


def ms(record: dict[str, Any], key: str) -> str:
    """``median (min)`` of one operation, in milliseconds."""
    return f"{1e3 * record[key + '_s']:.2f} ({1e3 * record[key + '_min_s']:.2f})"


def markdown(records: Sequence[dict[str, Any]], *, machine: str) -> str:
    """The results as a markdown table with a short legend."""
    rows = ["| model (params, fp32 size) | layout | ranks | allreduce Horovod ms | "
            "allreduce MPI ms | Allgatherv ms | bytes over TCP / call: allreduce (Horovod) | "
            "Allgatherv |",
            "|---|---|---|---|---|---|---|---|"]
    for r in records:
        mb = r["model_bytes"] / 1e6

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            b = r[key]
            if b < 1000:
                return "0 (shared memory)"
            return f"{b / 1e6:.2f} MB = {b / r['model_bytes']:.2f}x model"

        rows.append(
            f"| {r['model']} ({r['params']:,}, {mb:.2f} MB) | {r['layout']} | {r['ranks']} | "
            f"{ms(r, 'allreduce_horovod')} | {ms(r, 'allreduce_mpi')} | "
            f"{ms(r, 'allgatherv')} | {ratio('allreduce_horovod_bytes')} | "
            f"{ratio('allgatherv_bytes')} |")
    return (f"Measured on {machine}; times: median (min) of {records[0]['iters']} calls. "
            "Bytes: sum of both hosts' eth0 transmit counters (payload + TCP/IP headers).\n\n"
            + "\n".join(rows) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``worker`` (per rank) or the driver (default)."""
    p = argparse.ArgumentParser(prog="python -m tools.bench multinode",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", choices=("run", "worker"), default="run")
    p.add_argument("--models", nargs="+", choices=MODELS, default=["cnn", "resnet18"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    p.add_argument("--out", default=None, help="worker: where rank 0 writes its results")
    p.add_argument("--markdown", default=None, help="also write the markdown table here")
    p.add_argument("--json", default=None, help="also write the raw records here")
    p.add_argument("--prefix", default="mlbbench", help="cluster prefix (default %(default)s)")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error(f"--iters must be >= 1 and --warmup >= 0, got {args.iters}, {args.warmup}")
    if args.mode == "worker":
        if not args.out:
            p.error("worker needs --out")
        worker(args.models, iters=args.iters, warmup=args.warmup, out=Path(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    nc = _load_cluster_module()
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # so the finally below always runs
        signal.signal(sig, signal.default_int_handler)
    cluster = nc.NetnsCluster(hosts=2, slots=2, prefix=args.prefix).up()
    try:
        records = run_layouts(cluster, models=args.models, iters=args.iters,
                              warmup=args.warmup, layouts=args.layouts)
    finally:
        cluster.down()
    machine = (f"{os.cpu_count()} cores shared by all hosts, veth cable, "
               f"{time.strftime('%Y-%m-%d')}")
    table = markdown(records, machine=machine)
    sys.stdout.write(table)
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
