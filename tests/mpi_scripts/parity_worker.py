"""Worker for the 2-rank tests of torch's rules for parameters without gradient and frozen
parameters (issue 35): one process, or under ``mpirun -np 2``.

The model has a trunk and three heads: ``main`` (every sample), ``rank0_head`` (only the
first half of the global batch: on 2 ranks, rank 0's samples alone, so rank 1 has no
gradient for it) and ``never`` (no sample). The trunk is frozen at construction, unfrozen at
step 6, frozen again at 12 and unfrozen at 18. Each rank weights its loss so that the
averaged gradient is the single process's global-batch mean.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from worker_output import write_worker_output  # this folder (run as a script)

STEPS = 30
GLOBAL_BATCH = 32
FROZEN = (range(0, 6), range(12, 18))   # steps at which the trunk is frozen


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(8, 16)
        self.main = nn.Linear(16, 3)
        self.rank0_head = nn.Linear(16, 3)
        self.never = nn.Linear(16, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--variants", nargs="+", default=["horovod:reducescatter"],
                        metavar="BACKEND:REDUCE", help="train once per variant, from one seed")
    args = parser.parse_args()
    comm = init_communicator()
    for variant in args.variants:
        backend, reduce = variant.split(":")
        train(comm, backend, reduce, Path(args.out) / f"{backend}-{reduce}")


def train(comm: Any, backend: str, grad_reduce: str, out: Path) -> None:
    torch.manual_seed(0)
    model = Net().double()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.trunk.requires_grad_(False)
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05,
                       weight_decay=0.01, update_freq=3, history_size=4, comm=comm,
                       grad_backend=backend, grad_reduce=grad_reduce)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    y_all = (x_all[:, :3] * 2).argmax(1)
    lo = GLOBAL_BATCH * comm.rank // comm.size
    hi = GLOBAL_BATCH * (comm.rank + 1) // comm.size
    trunk_untouched_while_frozen = True
    for step in range(STEPS):
        frozen = any(step in r for r in FROZEN)
        model.trunk.requires_grad_(not frozen)
        trunk_before = [p.detach().clone() for p in model.trunk.parameters()]
        idx = torch.randint(0, 256, (GLOBAL_BATCH,), generator=gen)[lo:hi]
        x, y = x_all[idx], y_all[idx]
        positions = torch.arange(lo, hi)
        optimizer.zero_grad()
        h = torch.tanh(model.trunk(x))
        loss = nn.functional.cross_entropy(model.main(h), y, reduction="sum")
        first_half = positions < GLOBAL_BATCH // 2
        if first_half.any():
            loss = loss + nn.functional.cross_entropy(model.rank0_head(h[first_half]),
                                                      y[first_half], reduction="sum")
        (loss * comm.size / GLOBAL_BATCH).backward()
        optimizer.step()
        if frozen:
            trunk_untouched_while_frozen &= all(
                torch.equal(p, q) for p, q in zip(model.trunk.parameters(), trunk_before))
    optimizer.check_consistency()
    try:
        copy.deepcopy(optimizer)
        copy_refusal = None
    except TypeError as exc:
        copy_refusal = str(exc)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": comm.rank, "size": comm.size, "counters": optimizer.counters,
        "grad_steps": {optimizer.blocks[b].name: optimizer.block_state(b)["grad_steps"].tolist()
                       for b in optimizer.owned_blocks},
        "pairs": {optimizer.blocks[b].name: int(optimizer.block_state(b)["accepted"])
                  + int(optimizer.block_state(b)["rejected"]) for b in optimizer.owned_blocks},
        "trunk_untouched_while_frozen": trunk_untouched_while_frozen,
        "never_untouched": all(torch.equal(p, initial[f"never.{n}"])
                               for n, p in model.never.named_parameters()),
        "moved": sorted({n.split(".")[0] for n, p in model.named_parameters()
                         if not torch.equal(p, initial[n])}),
        "copy_refusal": copy_refusal,
    }
    write_worker_output(out, rank=comm.rank, record=record, model=model)


if __name__ == "__main__":
    main()
