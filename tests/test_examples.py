"""``examples/``: each script runs with no arguments on one process and, unchanged, under
``mpirun -np 2``; the production example's signal cycle (SIGUSR1 -> checkpoint -> exit 99 ->
rerun resumes -> exit 0) ends bit for bit where an uninterrupted run does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from mlbfgs_hpc.checkpoint import compare_checkpoints, find_latest_valid, list_checkpoints
from tests.mpi_helpers import PYTHON, REPO, mpi_env

pytest.importorskip("sklearn")  # both examples train on scikit-learn's digits

EXAMPLES = REPO / "examples"
TIMEOUT = 300


def _command(script: str, ranks: int, *args: str) -> list[str]:
    command = [PYTHON, str(EXAMPLES / script), *args]
    if ranks:
        mpirun = shutil.which("mpirun")
        assert mpirun, "mpirun not found: run tools/bootstrap.sh"
        command = [mpirun, "-np", str(ranks), "--bind-to", "none", *command]
    return command


def _run(script: str, ranks: int, cwd: Path, *args: str) -> str:
    # cwd: the production example's default run directory lands in the test's tmp_path.
    proc = subprocess.run(_command(script, ranks, *args), cwd=cwd, env=mpi_env(),
                          capture_output=True, text=True, timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}"
    return out


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("ranks", [0, 2])
def test_minimal_example(ranks: int, tmp_path: Path) -> None:
    out = _run("minimal.py", ranks, tmp_path)
    match = re.search(r"test accuracy after 20 epochs: ([\d.]+) %", out)
    assert match and float(match.group(1)) > 90.0, out[-3000:]
    assert out.count("test accuracy") == 1  # rank 0 alone reports


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("ranks", [0, 2])
def test_production_example_trains_and_checkpoints(ranks: int, tmp_path: Path) -> None:
    out = _run("production.py", ranks, tmp_path)
    assert "done: 220 steps" in out, out[-3000:]
    run_dir = tmp_path / "runs" / "production-example"
    # Every 50 steps and at the end, the newest 3 kept.
    assert [c.step for c in list_checkpoints(run_dir)] == [150, 200, 220]
    # A second start finds the finished run and does not train again.
    again = _run("production.py", ranks, tmp_path)
    assert "resumed from" in again and "at step 220" in again and "done: 220 steps" in again


def _wait_for_checkpoint(proc: subprocess.Popen[str], run_dir: Path, *,
                         timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be signalled"
        if find_latest_valid(run_dir) is not None:
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint in {run_dir} after {timeout:.0f} s")


@pytest.mark.timeout(3 * TIMEOUT)
@pytest.mark.parametrize("ranks", [0, 2])
def test_production_example_signal_cycle(ranks: int, tmp_path: Path) -> None:
    reference = tmp_path / "reference"  # uninterrupted, on as many ranks
    _run("production.py", ranks, tmp_path, "--run-dir", str(reference))

    run_dir = tmp_path / "signalled"
    log = (tmp_path / "signalled.log").open("w")
    # --step-sleep: slow enough that the signal lands mid-run, after the first checkpoint.
    proc = subprocess.Popen(_command("production.py", ranks, "--run-dir", str(run_dir),
                                     "--step-sleep", "0.1"),
                            cwd=tmp_path, env=mpi_env(), stdout=log, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        _wait_for_checkpoint(proc, run_dir, timeout=TIMEOUT)
        os.kill(proc.pid, signal.SIGUSR1)  # mpirun passes it on to every rank
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    out = (tmp_path / "signalled.log").read_text()
    assert code == 99, out[-3000:]
    stopped = re.search(r"checkpoint at step (\d+) written, exiting with 99", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 50 <= step < 220 and find_latest_valid(run_dir).name == f"step-{step:06d}"

    resumed = _run("production.py", ranks, tmp_path, "--run-dir", str(run_dir))
    assert f"at step {step} " in resumed and "done: 220 steps" in resumed, resumed[-3000:]
    difference = compare_checkpoints(find_latest_valid(reference), find_latest_valid(run_dir))
    assert difference.identical, difference.summary()


@pytest.mark.timeout(2 * TIMEOUT + 30)
def test_pinn_example_one_process_and_two_ranks(tmp_path: Path) -> None:
    """examples/pinn.py (the README's PINN example) trains the Poisson PINN from a relative
    L2 error of about 1 to below 5e-3 in its 15 steps, on one process and on 2 ranks. (The
    two do not end bit for bit: the ranks' losses are summed in another order, and over ~300
    closure evaluations the rounding grows; measured 1.11e-3 and 1.16e-3. test_pinn_train
    checks 2 ranks against 1 parameter by parameter over a shorter run.)"""
    pattern = r"loss ([\d.e+-]+), relative L2 error ([\d.e+-]+), (\d+) closure evaluations"
    for ranks in (0, 2):
        out = _run("pinn.py", ranks, tmp_path)
        assert out.count("relative L2 error") == 1, out[-3000:]   # rank 0 alone reports
        match = re.search(pattern, out)
        assert match, out[-3000:]
        loss, error, evals = match.groups()
        assert float(error) < 5e-3, (ranks, match.groups())
        assert 15 < int(evals) <= 15 * 25, (ranks, match.groups())   # searched: > 1 per step
