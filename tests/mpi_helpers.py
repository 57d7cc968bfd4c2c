"""Helpers for tests that run real ``mpirun`` jobs: environment, launch with a timeout,
and the "distributed result equals single-process result" comparison."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from tools.bench import common as bench_common

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SCRIPTS = REPO / "tests" / "mpi_scripts"
#: Environment for ``mpirun`` as root, oversubscribed on a small machine, this checkout first
#: on PYTHONPATH: the one the benchmarks use too.
mpi_env = bench_common.mpi_env


def mpirun(np: int, args: list[str], *, timeout: float = 240,
           env: dict[str, str] | None = None, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    """Run ``mpirun -np NP python ARGS`` (or plain python for NP == 0) with a hard timeout.

    A timeout fails the calling test via ``subprocess.TimeoutExpired`` instead of hanging.
    """
    if np == 0:
        cmd = [PYTHON, *args]
    else:
        mpirun_bin = shutil.which("mpirun")
        assert mpirun_bin, "mpirun not found: run tools/bootstrap.sh"
        cmd = [mpirun_bin, "-np", str(np), PYTHON, *args]
    proc = subprocess.run(cmd, env=env or mpi_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def assert_same_params(reference: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                       *, atol: float, rtol: float = 0.0) -> float:
    """Assert two parameter dicts agree within tolerance; return the largest difference."""
    assert reference.keys() == other.keys()
    worst = 0.0
    for name, ref in reference.items():
        diff = (ref - other[name]).abs().max().item()
        worst = max(worst, diff)
        torch.testing.assert_close(other[name], ref, atol=atol, rtol=rtol, msg=name)
    return worst


def load_module(name: str, path: Path) -> ModuleType:
    """Import a script (an MPI worker, a tool) from its file path under ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
