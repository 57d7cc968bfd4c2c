"""Worker for the multi-rank optimizer tests: train a small MLP, dump what the test checks.

Run as ``python dist_worker.py --out DIR`` (one process) or under ``mpirun -np N``. Every
rank takes its contiguous shard of the same global batch and weights its loss by
``shard/global`` × p, so the averaged gradient equals the single-process global-batch mean.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import mlbfgs_hpc.batched as batched_module
from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc.config import MLBFGSConfig
from worker_output import write_worker_output  # this folder (run as a script)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--backend", default="horovod")
    parser.add_argument("--grad-reduce", default="reducescatter")
    parser.add_argument("--node-aware", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--variants", nargs="*", default=None,
                        metavar="BACKEND:REDUCE:NODE[:after]",
                        help="train once per variant (e.g. mpi:reducescatter:on) in this one "
                             "job, each from the same seed, into OUT/BACKEND-REDUCE-NODE[-after]"
                             " (':after': Horovod's reduce-scatter after the backward pass, "
                             "not overlapped)")
    parser.add_argument("--after", action="store_true",
                        help="Horovod's reduce-scatter after the backward pass (not overlapped)")
    parser.add_argument("--update-freq", type=int, default=5)
    # The package default (0.2), so every p-ranks == 1-process run covers the default path.
    parser.add_argument("--double-damping", type=float, default=MLBFGSConfig().double_damping)
    parser.add_argument("--clip", default=MLBFGSConfig().clip)
    parser.add_argument("--nan-step", type=int, default=-1, help="poison rank 1's data here")
    parser.add_argument("--raise-on-rank", type=int, default=-1)
    parser.add_argument("--dtype", default="float64")
    parser.add_argument("--direct-min-numel", type=int, default=None,
                        help="blocks this large take the direct (GEMV) H·g, in place of the "
                             "CPU's 2**17 (the worker's blocks are 544, 792 and 100)")
    parser.add_argument("--group-momentum", action="store_true",
                        help="weights and biases in two param groups with outer momenta 0.5 "
                             "and 0.9, the weights' set to 0 for steps 10-14")
    parser.add_argument("--max-grad-norm", type=float, default=None,
                        help="MLBFGS(max_grad_norm=...): clipping inside the step")
    parser.add_argument("--user-clip", type=float, default=None,
                        help="optimizer.synchronize(), then torch's clip_grad_norm_ on the "
                             "averaged .grad (needs --grad-reduce allreduce), then step()")
    parser.add_argument("--grad-scaler", action="store_true",
                        help="torch.amp.GradScaler (init scale 2**8): scaled backward, "
                             "optimizer.synchronize(), unscale_, scaler.step, update")
    args = parser.parse_args()
    if args.direct_min_numel is not None:
        threshold = args.direct_min_numel
        batched_module.direct_min_numel_for = lambda device: threshold
    comm = init_communicator()
    if args.variants is None:
        train(args, comm, args.backend, args.grad_reduce, args.node_aware, Path(args.out),
              overlap=not args.after)
        return
    for variant in args.variants:
        backend, reduce, node, *after = variant.split(":")
        train(args, comm, backend, reduce, node, Path(args.out) / variant.replace(":", "-"),
              overlap=not after)


def train(args: argparse.Namespace, comm: Any, backend: str, grad_reduce: str, node: str,
          out: Path, *, overlap: bool = True) -> None:
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 4)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(512, 16, generator=gen, dtype=dtype)
    y_all = (x_all[:, :4] * 3).argmax(1)
    params: Any = model.parameters()
    if args.group_momentum:   # each block holds a weight and a bias: segments interleave
        params = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")],
                   "momentum": 0.5},
                  {"params": [p for n, p in model.named_parameters() if n.endswith("bias")]}]
    optimizer = MLBFGS(params, blocks=build_blocks(model), lr=0.05,
                       update_freq=args.update_freq, comm=comm, grad_backend=backend,
                       grad_reduce=grad_reduce, double_damping=args.double_damping, clip=args.clip,
                       node_aware={"auto": None, "on": True, "off": False}[node],
                       grad_overlap=overlap, max_grad_norm=args.max_grad_norm)
    # Model block ids of this rank's direct blocks (the batched object counts owned blocks).
    direct_blocks = [optimizer.owned_blocks[k] for k in optimizer._stochastic.batched.direct_blocks]
    timings: list[float] = []
    scaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1000)
              if args.grad_scaler else None)
    for step in range(args.steps):
        if step == 3 and comm.rank == args.raise_on_rank:
            raise RuntimeError(f"injected failure on rank {comm.rank}")
        idx = torch.randint(0, 512, (args.batch,), generator=gen)
        lo = args.batch * comm.rank // comm.size
        hi = args.batch * (comm.rank + 1) // comm.size
        x, y = x_all[idx[lo:hi]], y_all[idx[lo:hi]]
        if step == args.nan_step and comm.rank == min(1, comm.size - 1):
            x = x.clone()
            x[0, 0] = float("nan")
        if args.group_momentum:
            optimizer.param_groups[0]["momentum"] = 0.0 if 10 <= step < 15 else 0.5
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        scaled = loss * comm.size / args.batch
        (scaled if scaler is None else scaler.scale(scaled)).backward()
        if args.user_clip is not None:
            optimizer.synchronize()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.user_clip)
        start = time.perf_counter()
        if scaler is None:
            optimizer.step()
        else:   # the averaged .grad on every rank: the same inf check and scale everywhere
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        timings.append(time.perf_counter() - start)
    optimizer.check_consistency()
    if optimizer._reducer is not None:
        optimizer._reducer.remove_hooks()  # the next variant trains the same kind of model
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": comm.rank, "size": comm.size, "host": comm.hostname,
        "backend": optimizer.grad_backend, "grad_reduce": optimizer.grad_reduce,
        "node_aware": optimizer.node_aware, "overlap": overlap,
        "gradient_path": optimizer._reducer.path if optimizer._reducer is not None else None,
        "runs_sent_during_backward": (optimizer._reducer.runs_sent_during_backward
                                      if optimizer._reducer is not None else None),
        "owned_blocks": list(optimizer.owned_blocks),
        "direct_blocks": direct_blocks,
        "state_numel": {str(b): {k: v.numel() for k, v in optimizer.block_state(b).items()}
                        for b in optimizer.owned_blocks},
        "state_bytes": optimizer.optimizer_state_bytes(),
        "counters": optimizer.counters,
        "step_time_median": sorted(timings)[len(timings) // 2],
        "grad_scale": None if scaler is None else scaler.get_scale(),
    }
    write_worker_output(out, rank=comm.rank, record=record, model=model)


if __name__ == "__main__":
    main()
