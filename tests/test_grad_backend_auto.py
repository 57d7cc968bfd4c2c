"""``--grad-backend auto`` (the default): Horovod where it imports, mpi4py otherwise.

Real ``mpirun -np 2`` runs of the ``mlbfgs-train`` command with default flags. Horovod is
*hidden*, not mocked: a directory placed first on ``PYTHONPATH`` holds a ``horovod`` package
whose import raises ``ImportError``, exactly what a Python without Horovod installed raises,
so the real import machinery, the real mpi4py path and the real training run are exercised.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.mpi_helpers import PYTHON, REPO, mpi_env

TRAIN_ARGS = ["--dataset", "synthetic", "--model", "mlp", "--steps", "6"]


def _hide_horovod(root: Path) -> Path:
    package = root / "hide" / "horovod"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise ImportError("horovod hidden by tests/test_grad_backend_auto.py")\n')
    return package.parent


def _train_command() -> list[str]:
    """``mpirun -np 2 mlbfgs-train`` (the installed console script; ``python -m
    mlbfgs_hpc``, the same entry point, where the script is not on disk)."""
    mpirun = shutil.which("mpirun")
    assert mpirun, "mpirun not found: run tools/bootstrap.sh"
    script = Path(PYTHON).parent / "mlbfgs-train"
    command = [str(script)] if script.is_file() else [PYTHON, "-m", "mlbfgs_hpc"]
    return [mpirun, "-np", "2", "--bind-to", "none", *command, *TRAIN_ARGS]


def _run(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    # cwd: the default --run-dir (runs/default) lands in tmp_path, not in the checkout.
    proc = subprocess.run(_train_command(), cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-3000:]}"
    assert (tmp_path / "runs" / "default" / "metrics.jsonl").is_file()
    return proc


def test_auto_takes_mpi4py_when_horovod_does_not_import(tmp_path: Path) -> None:
    hide = _hide_horovod(tmp_path)
    env = mpi_env(PYTHONPATH=os.pathsep.join([str(hide), str(REPO)]))
    probe = subprocess.run([PYTHON, "-c", "import horovod.torch"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "ImportError: horovod hidden" in probe.stderr
    proc = _run(tmp_path, env)
    log = proc.stdout + proc.stderr
    assert log.count("gradient backend auto: mpi (Horovod is not usable on 2 of 2 "
                     "ranks; rank 0: horovod.torch does not import (ImportError: horovod "
                     "hidden") == 1, log[-3000:]
    assert "gradients: allreduce (mpi)" in log


def test_auto_takes_horovod_when_it_imports(tmp_path: Path) -> None:
    pytest.importorskip("horovod.torch")
    proc = _run(tmp_path, mpi_env())
    log = proc.stdout + proc.stderr
    assert log.count("gradient backend auto: horovod") == 1, log[-3000:]
    assert "gradients: allreduce (horovod)" in log
