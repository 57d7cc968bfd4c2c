"""Checkpoint size, write time and read time, next to the disk's sequential write speed.

::

    python -m tools.bench checkpoint [--ranks 1,4] [--repeats 3] [--disk-mb 1024] [--dir DIR]

Trains the MLP 784-256-128-10 (float32, 235 146 parameters) with mL-BFGS (history 10,
update period 1, so the ring is full) for a few steps on synthetic data, then times
``save_checkpoint`` and ``load_checkpoint`` (with and without the sha256 check) on each
world size, and the disk with a python write + fsync of ``--disk-mb`` MiB in the same run.
World sizes > 1 are launched with ``mpirun`` (as root this sets the Open MPI variables that
allow it). Prints one JSON object on stdout; times are medians over ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
from mlbfgs_hpc.checkpoint import load_checkpoint, save_checkpoint

from . import common


def disk_write_speed(directory: Path, megabytes: int) -> dict[str, float]:
    """Sequential write of ``megabytes`` MiB in 16 MiB blocks, then fsync (like dd conv=fsync)."""
    block = os.urandom(16 << 20)
    path = directory / "disk-speed.bin"
    started = time.perf_counter()
    with path.open("wb") as fh:
        for _ in range(max(1, megabytes // 16)):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - started
    size = path.stat().st_size
    path.unlink()
    return {"bytes": size, "seconds": seconds, "mib_per_s": size / 2**20 / seconds}


def build(comm: Any) -> tuple[torch.nn.Module, MLBFGS]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05,
                       history_size=10, update_freq=1, comm=comm, grad_backend="mpi")
    return model, optimizer


def bench_world(directory: Path, *, steps: int, repeats: int) -> dict[str, Any] | None:
    """Run on the current world (called on every rank); rank 0 returns the numbers."""
    comm = init_communicator()
    model, optimizer = build(comm)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(64, 784, generator=gen)
        y = torch.randint(0, 10, (64,), generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    run = directory / f"run-p{comm.size}"
    writes, reads, reads_nover = [], [], []
    path = run
    for i in range(repeats):
        comm.barrier()
        started = time.perf_counter()
        path = save_checkpoint(run, step=steps + i, model=model, optimizer=optimizer,
                               comm=comm, keep=1)
        writes.append(time.perf_counter() - started)
    for verify, out in ((True, reads), (False, reads_nover)):
        for _ in range(repeats):
            model2, optimizer2 = build(comm)
            comm.barrier()
            started = time.perf_counter()
            load_checkpoint(path, model=model2, optimizer=optimizer2, comm=comm,
                            verify_digests=verify)
            comm.barrier()
            out.append(time.perf_counter() - started)
    if comm.rank != 0:
        return None
    manifest = json.loads((path / "manifest.json").read_text())
    size = sum(f["bytes"] for f in manifest["files"].values())
    return {
        "world_size": comm.size,
        "checkpoint_bytes": size,
        "files": len(manifest["files"]),
        "state_bytes_rank0": optimizer.optimizer_state_bytes(),
        "write_s": statistics.median(writes),
        "read_s": statistics.median(reads),
        "read_no_digest_s": statistics.median(reads_nover),
        "write_mib_per_s": size / 2**20 / statistics.median(writes),
        "accepted_pairs": optimizer.counters["accepted_pairs"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="1,4", help="comma-separated world sizes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="training steps before saving")
    parser.add_argument("--disk-mb", type=int, default=1024)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir "
                        "under ./bench-results)")
    parser.add_argument("--mpirun", default="mpirun")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.steps < 3:
        parser.error("--repeats must be >= 1 and --steps >= 3")

    if args.worker:
        result = bench_world(Path(args.dir), steps=args.steps, repeats=args.repeats)
        if result is not None:
            (Path(args.dir) / f"result-p{result['world_size']}.json").write_text(
                json.dumps(result))
        return 0

    base = Path(args.dir) if args.dir else Path("bench-results")
    base.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="ckpt-bench-", dir=base))
    try:
        report: dict[str, Any] = {"directory": str(scratch.resolve()),
                                  "disk": disk_write_speed(scratch, args.disk_mb),
                                  "torch_threads": torch.get_num_threads(), "runs": []}
        for p in (int(v) for v in args.ranks.split(",")):
            if p == 1:
                report["runs"].append(bench_world(scratch, steps=args.steps,
                                                  repeats=args.repeats))
                continue
            cmd = [args.mpirun, "-np", str(p), *common.module_command(
                "checkpoint", "--worker", "--dir", str(scratch), "--steps", str(args.steps),
                "--repeats", str(args.repeats))]
            subprocess.run(cmd, check=True, timeout=600, env=common.mpi_env())
            report["runs"].append(json.loads((scratch / f"result-p{p}.json").read_text()))
        print(json.dumps(report, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
