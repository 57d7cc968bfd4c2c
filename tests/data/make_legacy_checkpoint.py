"""Writes ``tests/data/legacy-0.1.0/``: a checkpoint in the format of mlbfgs-hpc 0.1.0.

Generated once with the code of commit 7f445c8 (the single-module ``checkpoint.py``, before
it became a package), on 2 ranks::

    git archive 7f445c8 | tar -x -C /tmp/old
    cd /tmp/old && OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 \\
        mpirun -np 2 python REPO/tests/data/make_legacy_checkpoint.py REPO/tests/data/legacy-0.1.0

``tests/test_checkpoint.py::test_checkpoint_written_by_0_1_0_still_loads`` checks that the
current code verifies and loads it. Never regenerate it with newer code: its point is to be
old.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc import checkpoint as ckpt


def build_model() -> torch.nn.Module:
    """The model of the legacy checkpoint (the test builds the same)."""
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def main(out: Path) -> None:
    comm = init_communicator()
    model = build_model()
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05, update_freq=2,
                       history_size=2, comm=comm)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    torch.manual_seed(4)
    for _ in range(6):
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    ckpt.save_checkpoint(out, step=6, model=model, optimizer=optimizer, comm=comm,
                         scheduler=scheduler, extra={"epoch": 0, "batch_index": 6},
                         config={"note": "legacy fixture"})
    if comm.rank == 0:
        expected = {"params": {k: v.tolist() for k, v in model.state_dict().items()},
                    "counters": {k: float(v) for k, v in optimizer.counters.items()},
                    "lr": scheduler.get_last_lr()}
        (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
