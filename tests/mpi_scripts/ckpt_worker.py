"""Worker for the checkpoint tests: train a small MLP with mL-BFGS, save, resume, fail on cue.

Run in-process (``run(argv)``, one rank), as ``python ckpt_worker.py ...`` or under
``mpirun -np N``. Every rank takes its contiguous shard of the same global batch and weights
its loss by ``p / B`` so the averaged gradient equals the global-batch mean. The trajectory
uses all three RNGs a checkpoint restores:

* numpy's global RNG draws the batch indices and python's ``random`` an input offset; both
  are seeded identically on every rank (a shared stream: continues exactly on any world size);
* torch's global RNG is seeded per rank (``100 + rank``) and drives optional dropout; after
  every save and every load each rank draws a "probe" from it, so a test can check that each
  rank got its own stream back.

Outputs in ``--out``: ``rank<r>.json`` per rank (probes, counters, errors, timings) and, from
rank 0, ``params.npz`` (the final model parameters, written without pickle).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc import checkpoint as ckpt


def build_model(*, dropout: float, dtype: torch.dtype) -> torch.nn.Module:
    """The test MLP: 3 Linear layers, i.e. 3 blocks (rank 3 of 4 owns none)."""
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, 32), torch.nn.Tanh()]
    if dropout > 0:
        layers.append(torch.nn.Dropout(dropout))
    layers += [torch.nn.Linear(32, 24), torch.nn.Tanh(), torch.nn.Linear(24, 4)]
    return torch.nn.Sequential(*layers).to(dtype)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--save-at", default="", help="comma-separated steps to save after")
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--resume", default="", help="checkpoint/run dir, 'auto' or empty")
    parser.add_argument("--resave-dir", default="",
                        help="right after loading, save the loaded state again here")
    parser.add_argument("--expect-error-from", default="",
                        help="first load this (damaged) checkpoint and record the error")
    parser.add_argument("--kill-at", type=int, default=-1,
                        help="when saving this step, touch OUT/at_manifest and sleep before "
                             "the manifest is written (the test then kills us)")
    parser.add_argument("--visibility-wait", type=float, default=None)
    parser.add_argument("--backend", default="mpi")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--dtype", default="float64")
    return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train as the arguments say; returns this rank's record (also written to --out)."""
    args = parse_args(argv)
    comm = init_communicator()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.visibility_wait is not None:
        ckpt.VISIBILITY_WAIT_S = args.visibility_wait
    if args.kill_at >= 0:
        def pause(tmp: Path) -> None:
            if f"-{ckpt.step_dir_name(args.kill_at)}-" not in tmp.name:
                return
            (out / "at_manifest").write_text(str(tmp))
            time.sleep(120)
        ckpt.write._BEFORE_MANIFEST_HOOK = pause

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(dropout=args.dropout, dtype=dtype)
    np.random.seed(0)
    random.seed(0)
    torch.manual_seed(100 + comm.rank)
    gen = torch.Generator().manual_seed(1)
    x_all = torch.randn(512, 16, generator=gen, dtype=dtype)
    y_all = (x_all[:, :4] * 3).argmax(1)
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05,
                       update_freq=3, history_size=4, comm=comm, grad_backend=args.backend)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.7)
    record: dict[str, Any] = {"rank": comm.rank, "size": comm.size, "probes": {},
                              "owned_blocks": list(optimizer.owned_blocks), "errors": {}}

    def probe(step: int) -> None:
        record["probes"][str(step)] = torch.rand(2, dtype=torch.float64).tolist()

    if args.expect_error_from:
        try:
            ckpt.load_checkpoint(args.expect_error_from, model=model, optimizer=optimizer,
                                 comm=comm, scheduler=scheduler)
            record["errors"]["damaged"] = None
        except ckpt.CheckpointError as exc:
            record["errors"]["damaged"] = f"{type(exc).__name__}: {exc}"

    start = 0
    if args.resume:
        started = time.perf_counter()
        if args.resume == "auto":
            loaded = ckpt.resume(args.run_dir, model=model, optimizer=optimizer, comm=comm,
                                 scheduler=scheduler)
        else:
            loaded = ckpt.load_checkpoint(args.resume, model=model, optimizer=optimizer,
                                          comm=comm, scheduler=scheduler)
        record["load_s"] = time.perf_counter() - started
        if loaded is not None:
            start = int(loaded.extra["step"])
            record["loaded"] = {"step": loaded.step, "world_size": loaded.world_size,
                                "path": str(loaded.path)}
            if args.resave_dir:
                ckpt.save_checkpoint(args.resave_dir, step=start, model=model,
                                     optimizer=optimizer, comm=comm, scheduler=scheduler,
                                     extra={"step": start})
            probe(start)

    save_at = {int(s) for s in args.save_at.split(",") if s}
    for step in range(start, args.steps):
        idx = torch.from_numpy(np.random.randint(0, 512, size=args.batch))
        shift = random.gauss(0.0, 0.01)
        lo = args.batch * comm.rank // comm.size
        hi = args.batch * (comm.rank + 1) // comm.size
        x, y = x_all[idx[lo:hi]] + shift, y_all[idx[lo:hi]]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum")
        (loss * comm.size / args.batch).backward()
        optimizer.step()
        scheduler.step()
        done = step + 1
        if done in save_at:
            try:
                path = ckpt.save_checkpoint(args.run_dir, step=done, model=model,
                                            optimizer=optimizer, comm=comm,
                                            scheduler=scheduler, extra={"step": done},
                                            config={"test": "ckpt_worker"}, keep=args.keep)
                record.setdefault("saved", []).append(str(path))
            except ckpt.CheckpointError as exc:
                record["errors"]["save"] = f"{type(exc).__name__}: {exc}"
                break
            probe(done)

    record["counters"] = optimizer.counters
    record["final_lr"] = optimizer.param_groups[0]["lr"]
    (out / f"rank{comm.rank}.json").write_text(json.dumps(record))
    if comm.rank == 0:
        np.savez(out / "params.npz", **{n: p.detach().numpy()
                                        for n, p in model.named_parameters()})
    return record


if __name__ == "__main__":
    run(sys.argv[1:])
