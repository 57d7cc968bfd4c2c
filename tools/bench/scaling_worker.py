"""One rank of the scaling benchmark: time the pieces of an mL-BFGS step on p ranks.

Run by :mod:`scaling` as ``mpirun -np P python -m tools.bench.scaling_worker --out F``
(or plain ``python`` for the one-process baseline). The model is a deep MLP on 8x8 inputs
(``--depth`` hidden layers of ``--width``): many equal layers, so the blocks (one layer each)
split evenly over ranks and the optimizer, not the forward pass, dominates the step.

Per timed step every rank records: forward+backward seconds (with Horovod this includes
launching the gradient allreduces from the backward hooks), the whole ``optimizer.step()``,
and inside it — by wrapping the instance's collaborators with timers, the optimizer itself is
unmodified — the gradient reduction wait (``GradientReducer.synchronize``), the scalar
all-gathers and the ``Allgatherv`` of the update slices. "Local" is the step minus those.
Rank 0 gathers every rank's record and writes one JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc.data import shard_bounds
from mlbfgs_hpc.models import build_model

from .common import add_timer


def _wrap(owner: Any, attr: str, sink: dict[str, float], key: str) -> None:
    add_timer(owner, attr, sink, key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file rank 0 writes")
    parser.add_argument("--backend", choices=("horovod", "mpi"), default="horovod")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--update-freq", type=int, default=5,
                        help="T; small so the ring fills within the warm-up")
    parser.add_argument("--timed-steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)

    comm = init_communicator()
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=(1, 8, 8), num_classes=10,
                        hidden_sizes=(args.width,) * args.depth)
    comm.broadcast_tensors_(list(model.parameters()))
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.02,
                       history_size=args.history, update_freq=args.update_freq, comm=comm,
                       grad_backend=args.backend)
    sink: dict[str, float] = defaultdict(float)
    if optimizer._reducer is not None:
        _wrap(optimizer._reducer, "synchronize", sink, "grad_reduce")
    _wrap(comm, "allgather_scalars", sink, "scalar_allgather")
    _wrap(comm, "allgatherv_", sink, "allgatherv")

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(64, 10, generator=gen)
    lo, hi = shard_bounds(args.batch, rank=comm.rank, world_size=comm.size)
    warmup = (args.history + 1) * args.update_freq + 2
    records: list[dict[str, float]] = []
    for step in range(warmup + args.timed_steps):
        x = torch.randn(args.batch, 1, 8, 8, generator=gen)  # same stream on every rank
        y = (x.flatten(1) @ weight).argmax(1)
        sink.clear()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum")
        (loss * comm.size / args.batch).backward()
        t1 = time.perf_counter()
        optimizer.step()
        t2 = time.perf_counter()
        if step >= warmup:
            comm_s = sink["grad_reduce"] + sink["scalar_allgather"] + sink["allgatherv"]
            records.append({"fwd_bwd": t1 - t0, "step": t2 - t1, "iteration": t2 - t0,
                            "local": (t2 - t1) - comm_s, **dict(sink)})
    optimizer.check_consistency()
    keys = sorted({k for r in records for k in r})
    mine = {
        "rank": comm.rank, "size": comm.size, "backend": args.backend,
        "owned_blocks": list(optimizer.owned_blocks),
        "owned_numel": int(optimizer._owned_numel),
        "total_numel": int(optimizer.ownership.total_numel),
        "state_bytes": optimizer.optimizer_state_bytes(),
        "update_vector_bytes": optimizer._update.numel() * optimizer._update.element_size(),
        "accepted_pairs": optimizer.counters["accepted_pairs"],
        "median_s": {k: statistics.median(r.get(k, 0.0) for r in records) for k in keys},
        "samples_s": {k: [r.get(k, 0.0) for r in records] for k in keys},
        "pid": os.getpid(),
    }
    everyone = comm.allgather_object(mine)
    if comm.rank == 0:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"ranks": everyone, "args": vars(args)}, indent=1))


if __name__ == "__main__":
    main()
