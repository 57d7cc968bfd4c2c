"""Worker for the multi-rank line-search tests: full-batch regression, dump what they check.

Run as ``python searched_worker.py --out DIR`` (one process) or under ``mpirun -np N``. The
data (the same on every rank, from a fixed seed) is split into contiguous shards; each rank's
closure returns the mean loss of its own shard, the optimizer averages losses and gradients
over ranks, so with equal shards the run optimises the global mean loss, as one process does.
``--local-decisions`` makes a rank's closure return its own loss *while the optimizer
believes it is global* (a defect on purpose): the ranks then disagree on the search and the
run must not hang silently (the test bounds it with a timeout).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc.data import shard_bounds
from worker_output import write_worker_output  # this folder (run as a script)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--max-iter", type=int, default=1)
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--backend", default="horovod")
    parser.add_argument("--grad-reduce", default="allreduce")
    parser.add_argument("--beta", type=float, default=0.0, help="momentum pairs (β > 0)")
    parser.add_argument("--history-size", type=int, default=20)
    args = parser.parse_args()

    comm = init_communicator()
    dtype = torch.float64
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 24), torch.nn.Tanh(),
                                torch.nn.Linear(24, 1)).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.rand(args.samples, 6, generator=gen, dtype=dtype) * 2 - 1
    y_all = torch.sin(3 * x_all[:, :1]) * torch.cos(2 * x_all[:, 1:2]) + x_all[:, 2:3] ** 2
    lo, hi = shard_bounds(args.samples, rank=comm.rank, world_size=comm.size)
    x, y = x_all[lo:hi], y_all[lo:hi]
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=1.0,
                       line_search_fn="strong_wolfe", max_iter=args.max_iter,
                       history_size=args.history_size, beta_param=args.beta,
                       beta_grad=args.beta, comm=comm, grad_backend=args.backend,
                       grad_reduce=args.grad_reduce)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss.detach()

    losses = [float(optimizer.step(closure)) for _ in range(args.steps)]
    optimizer.check_consistency()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": comm.rank, "size": comm.size, "losses": losses,
              "counters": optimizer.counters, "owned_blocks": list(optimizer.owned_blocks),
              "state_bytes": optimizer.optimizer_state_bytes(),
              "history_elements": optimizer._searched.curvature.history.numel(),
              "owned_numel": sum(optimizer.blocks[b].numel for b in optimizer.owned_blocks)}
    write_worker_output(out, rank=comm.rank, record=record, model=model)


if __name__ == "__main__":
    main()
