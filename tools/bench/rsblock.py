"""The mpi4py reduce-scatter of the gradient: uneven ``Reduce_scatter`` (what the package
uses: the ownership counts, no padding) against ``Reduce_scatter_block`` of a buffer padded
to the largest slice (equal counts, which MPI libraries may optimise better, at the price of
the padding's bytes).

Each rank of the worker (under ``mpirun``) builds a real model's ownership table
(:class:`mlbfgs_hpc.partition.Ownership` over its blocks) and times both collectives in
alternation, ``--iters`` calls each, between barriers; the time of a call is the slowest
rank's. The driver runs the worker on one host x 4 ranks (shared memory) and on a
``tools/netns`` cluster of 2 hosts x 2 ranks with links shaped to ``--rate``::

    python -m tools.bench rsblock --models cnn resnet18 --rate 1gbit --iters 20

The padded variant calls ``mpi4py`` directly (the package's communicator does not offer it;
this benchmark is what decided that).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import common

logger = logging.getLogger(__name__)

_TIMEOUT_S = 900


def worker(*, models: Sequence[str], iters: int, out: Path) -> None:
    import torch

    from mlbfgs_hpc import build_blocks, init_communicator
    from mlbfgs_hpc.models import build_model
    from mlbfgs_hpc.partition import Ownership

    torch.set_num_threads(1)
    comm = init_communicator()
    MPI = comm._MPI  # noqa: N806 - the padded variant is not part of the communicator
    records = []
    for name in models:
        model = build_model(name, in_shape=(1, 28, 28), num_classes=10)
        ownership = Ownership.build(block_numels=[b.numel for b in build_blocks(model)],
                                    world_size=comm.size)
        counts, total = list(ownership.counts), ownership.total_numel
        width = max(counts)
        full = torch.randn(total)
        owned = torch.empty(counts[comm.rank])
        padded = torch.zeros(comm.size * width)
        block_out = torch.empty(width)

        def uneven() -> None:
            comm.reduce_scatter_sum_(full, owned, counts)

        def block() -> None:
            # Pack into equal rows (what a padded path would do), then one equal-count call.
            for r in range(comm.size):
                padded[r * width:r * width + counts[r]] = full[ownership.offsets[r]:
                                                               ownership.offsets[r] + counts[r]]
            comm._comm.Reduce_scatter_block(padded.numpy(), block_out.numpy(), op=MPI.SUM)

        times: dict[str, list[float]] = {"uneven": [], "block": []}
        for fn in (uneven, block):
            fn()  # warm-up
        for i in range(iters):
            for label, fn in (("uneven", uneven), ("block", block))[::1 if i % 2 == 0 else -1]:
                slowest, _ = common.time_collective(comm, fn, iters=1)
                times[label].append(slowest[0])
        records.append({"model": name, "ranks": comm.size, "hosts": comm.layout.hosts,
                        "params": total, "counts": counts, "padded_numel": comm.size * width,
                        "times": times})
    if comm.rank == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, env=common.mpi_env(), capture_output=True, text=True,
                          timeout=_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")


def measure(*, models: Sequence[str], iters: int, rate: str, prefix: str) -> list[dict[str, Any]]:
    from .. import netns

    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-rsblock-") as tmp:
        args = ["--models", *models, "--iters", str(iters)]
        local = Path(tmp) / "local.jsonl"
        _run(["timeout", str(_TIMEOUT_S - 30), "mpirun", "-np", "4",
              *common.module_command("rsblock", "worker", "--out", str(local), *args)])
        records += [{"layout": "1 host x 4", **json.loads(line)}
                    for line in local.read_text().splitlines()]
        cluster = netns.NetnsCluster(hosts=2, slots=2, prefix=prefix,
                                     link_rate=None if rate == "none" else rate).up()
        try:
            remote = Path(tmp) / "hosts.jsonl"
            _run(cluster.mpirun_cmd(4, common.module_command(
                "rsblock", "worker", "--out", str(remote), *args), forward=["PYTHONPATH"],
                timeout_s=_TIMEOUT_S - 30))
            records += [{"layout": f"2 hosts x 2, {rate}", **json.loads(line)}
                        for line in remote.read_text().splitlines()]
        finally:
            cluster.down()
    return records


def markdown(records: Sequence[dict[str, Any]]) -> str:
    out = ["| layout | model (params) | padded / model elements | uneven `Reduce_scatter` ms "
           "| padded `Reduce_scatter_block` ms | block / uneven, per call pair |",
           "|---|---|---|---|---|---|"]
    for r in records:
        u, b = r["times"]["uneven"], r["times"]["block"]
        ratio = [y / x for x, y in zip(u, b)]
        out.append(f"| {r['layout']} | {r['model']} ({r['params']:,}) | "
                   f"{r['padded_numel'] / r['params']:.2f} | {1e3 * statistics.median(u):.2f} | "
                   f"{1e3 * statistics.median(b):.2f} | {statistics.median(ratio):.2f} "
                   f"[{min(ratio):.2f}–{max(ratio):.2f}] |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench rsblock",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", choices=("run", "worker"), default="run")
    p.add_argument("--models", nargs="+", default=["cnn", "resnet18"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--rate", default="1gbit")
    p.add_argument("--out", default=None, help="worker: where rank 0 writes its records")
    p.add_argument("--json", default=None)
    p.add_argument("--prefix", default="mlbrsb")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode == "worker":
        worker(models=args.models, iters=args.iters, out=Path(args.out))
        return 0
    records = measure(models=args.models, iters=args.iters, rate=args.rate, prefix=args.prefix)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print(markdown(records), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
