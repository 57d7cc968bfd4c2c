"""Helpers for tests that run the real training command (``python -m mlbfgs_hpc``) as a process.

Shared by ``test_signals.py`` (signals sent by the test) and ``test_jobs.py`` (the batch scripts
under a real SLURM/PBS front end): start a run with a hard timeout, wait until its
``metrics.jsonl`` shows progress, read metrics and checkpoints back, and compare the final state
of two runs bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from mlbfgs_hpc.checkpoint import diff_checkpoints, find_latest_valid, list_checkpoints
from tests.mpi_helpers import PYTHON, REPO, mpi_env

#: A small, fast training configuration (MLP on synthetic data, 16 steps per epoch).
BASE_ARGS: tuple[str, ...] = ("--dataset", "synthetic", "--model", "mlp", "--quiet")


def train_env(**extra: str) -> dict[str, str]:
    """Environment for training processes: this checkout first on PYTHONPATH, MPI as root."""
    return mpi_env(**extra)


def train_command(args: list[str] | tuple[str, ...], *, ranks: int = 0) -> list[str]:
    """``python -m mlbfgs_hpc ARGS``, under ``mpirun -np RANKS`` when ``ranks`` > 0."""
    cmd = [PYTHON, "-m", "mlbfgs_hpc", *args]
    if ranks > 0:
        mpirun = shutil.which("mpirun")
        assert mpirun, "mpirun not found: run tools/bootstrap.sh"
        cmd = [mpirun, "-np", str(ranks), "--bind-to", "none", *cmd]
    return cmd


class TrainProcess:
    """One training process (or ``mpirun`` and its ranks) started in the background.

    Args:
        args: arguments of ``python -m mlbfgs_hpc``.
        log: file that receives stdout and stderr.
        ranks: 0 for a plain process, else the number of ``mpirun`` ranks.
    """

    def __init__(self, *, args: list[str] | tuple[str, ...], log: Path, ranks: int = 0) -> None:
        self.log = log
        self.started = time.monotonic()
        self._log_handle = log.open("w")
        self.proc = subprocess.Popen(
            train_command(args, ranks=ranks), stdout=self._log_handle,
            stderr=subprocess.STDOUT, env=train_env(), cwd=REPO, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def rank_pids(self, ranks: int, *, timeout: float = 30.0) -> dict[int, int]:
        """``{rank: pid}`` of the ranks ``mpirun`` started (read from their environment)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found: dict[int, int] = {}
            for child in _children(self.pid):
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                for item in environ:
                    if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                        found[int(item.split(b"=", 1)[1])] = child
            if len(found) == ranks:
                return found
            time.sleep(0.1)
        raise AssertionError(f"did not find {ranks} ranks under mpirun {self.pid}:\n"
                             f"{self.output()[-3000:]}")

    def wait(self, *, timeout: float) -> int:
        """Exit code; on timeout kill the whole process group and fail the test."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"training still running after {timeout:.0f} s; killed it:\n"
                                 f"{self.output()[-3000:]}") from None
        finally:
            self._log_handle.close()

    def kill(self) -> None:
        """SIGKILL the process group (this process, and mpirun's ranks with it)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def run_training(args: list[str] | tuple[str, ...], *, log: Path, ranks: int = 0,
                 timeout: float = 180.0) -> tuple[int, str]:
    """Run training to its end; return (exit code, combined output)."""
    proc = TrainProcess(args=args, log=log, ranks=ranks)
    code = proc.wait(timeout=timeout)
    return code, proc.output()


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of ``run_dir/metrics.jsonl`` (NaN values are allowed, as json writes them)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_steps(run_dir: Path) -> list[int]:
    """Steps of the ``train`` records, in file order."""
    return [r["step"] for r in read_metrics(run_dir) if r.get("event") == "train"]


def wait_for_step(proc: TrainProcess, run_dir: Path, step: int, *, timeout: float) -> float:
    """Wait until ``metrics.jsonl`` has a train record at ``step`` or later; return the time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = train_steps(run_dir)
        if steps and steps[-1] >= step:
            return time.monotonic()
        if proc.proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.proc.returncode} before step "
                                 f"{step}:\n{proc.output()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"no train record at step >= {step} after {timeout:.0f} s:\n"
                         f"{proc.output()[-3000:]}")


def checkpoint_steps(run_dir: Path) -> list[int]:
    """Steps of the complete, valid checkpoints of ``run_dir``, oldest first."""
    return sorted(info.step for info in list_checkpoints(run_dir) if info.valid)


def assert_same_final_state(reference_run: Path, run: Path) -> int:
    """Assert the newest checkpoints of two runs are bitwise equal; return entries compared.

    Model parameters, every optimizer tensor (mL-BFGS history, momentum, ...), counters, LR
    scheduler and data position are compared; run metadata (wall-clock time) is not.
    """
    a, b = find_latest_valid(reference_run), find_latest_valid(run)
    assert a is not None and b is not None, (a, b)
    diffs, compared = diff_checkpoints(a, b)
    assert not diffs, f"{len(diffs)} of {compared} entries differ between {a} and {b}:\n" + \
        "\n".join(diffs[:20])
    assert compared > 10, compared
    return compared
