"""Graceful stop without a scheduler: signals sent by the test to real training processes.

``mlbfgs-train`` (``python -m mlbfgs_hpc``) must, on SIGUSR1 or a first SIGTERM (sent to the
process, to ``mpirun``, which forwards SIGUSR1 to every rank, or to ONE rank only), write a
checkpoint at the next step boundary on which all ranks agree and exit with 99; a second
SIGTERM exits at once with 143; ``--stop-after`` does the same as a signal. Nothing that was
checkpointed is lost: resuming a stopped run with the same arguments ends in the bitwise same
state (parameters, mL-BFGS history, momentum, schedule, data position) as an uninterrupted run.
``--step-sleep`` widens the window between steps for the test without changing the math.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from mlbfgs_hpc.checkpoint import list_checkpoints
from mlbfgs_hpc.signals import EXIT_IMMEDIATE, EXIT_OK, EXIT_REQUEUE
from tests.train_runs import (
    BASE_ARGS,
    TrainProcess,
    assert_same_final_state,
    checkpoint_steps,
    read_metrics,
    run_training,
    train_steps,
    wait_for_step,
)

STEPS = 60  # the total length of the runs that are stopped and resumed (cosine schedule)
ARGS = [*BASE_ARGS, "--steps", str(STEPS), "--log-every", "5"]
ENDLESS = [*BASE_ARGS, "--steps", "100000", "--log-every", "1"]
STOP_TIMEOUT = 60.0  # signal -> process gone (one step, a checkpoint, shutdown), generous
START_TIMEOUT = 90.0  # start -> first metrics record, on a loaded 2-core machine


def _stopped_at(run_dir: Path, output: str) -> int:
    """The step of the signal checkpoint, checked against the log and the checkpoint list."""
    logged = [int(s) for s in re.findall(r"checkpoint at step (\d+) written", output)]
    assert logged, output[-3000:]
    assert checkpoint_steps(run_dir) == [logged[0]], (checkpoint_steps(run_dir), output[-3000:])
    return logged[0]


def _wait_requeued(proc: TrainProcess, run_dir: Path) -> tuple[str, int]:
    """Wait for a stopped run; assert it exited with 99; return its output and stop step."""
    code = proc.wait(timeout=STOP_TIMEOUT)
    out = proc.output()
    assert code == EXIT_REQUEUE, out[-3000:]
    return out, _stopped_at(run_dir, out)


@pytest.mark.timeout(300)
def test_sigusr1_checkpoints_and_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """SIGUSR1 -> checkpoint + 99; resuming gives bitwise the state of a run never stopped."""
    reference = tmp_path / "reference"
    code, out = run_training([*ARGS, "--run-dir", str(reference)], log=tmp_path / "ref.log")
    assert code == EXIT_OK, out[-3000:]

    run = tmp_path / "run"
    proc = TrainProcess(args=[*ARGS, "--run-dir", str(run), "--step-sleep", "0.1"],
                        log=tmp_path / "run.log")
    wait_for_step(proc, run, 10, timeout=START_TIMEOUT)
    proc.proc.send_signal(signal.SIGUSR1)
    out, stopped = _wait_requeued(proc, run)
    assert "received SIGUSR1" in out, out[-3000:]
    assert 10 <= stopped < STEPS, stopped
    records = read_metrics(run)
    assert [r["step"] for r in records if r["event"] == "train"] == list(
        range(5, stopped + 1, 5)), records
    assert not [r for r in records if r["event"] == "summary"], records

    code, out = run_training([*ARGS, "--run-dir", str(run)], log=tmp_path / "resume.log")
    assert code == EXIT_OK, out[-3000:]
    assert f"at step {stopped} " in out, out[-3000:]
    steps = train_steps(run)
    assert steps == sorted(set(steps)) and steps[-1] == STEPS, steps
    summary = read_metrics(run)[-1]
    assert summary["event"] == "summary" and summary["step"] == STEPS, summary
    assert checkpoint_steps(run)[-1] == STEPS
    compared = assert_same_final_state(reference, run)
    print(f"SIGUSR1 at step {stopped} of {STEPS}: resumed run equals the uninterrupted one "
          f"({compared} checkpoint entries, bitwise)")


@pytest.mark.timeout(200)
def test_sigterm_checkpoints_and_exits_99(tmp_path: Path) -> None:
    """A first SIGTERM (PBS, scancel, a node drain) checkpoints and exits with 99 too."""
    run = tmp_path / "run"
    proc = TrainProcess(args=[*ENDLESS, "--run-dir", str(run), "--step-sleep", "0.05"],
                        log=tmp_path / "run.log")
    wait_for_step(proc, run, 3, timeout=START_TIMEOUT)
    proc.proc.send_signal(signal.SIGTERM)
    out, stopped = _wait_requeued(proc, run)
    assert "received SIGTERM" in out, out[-3000:]
    assert train_steps(run)[-1] == stopped, train_steps(run)


@pytest.mark.timeout(200)
def test_late_sigusr1_after_the_run_keeps_exit_code_0(tmp_path: Path) -> None:
    """A warning that arrives once the run is over (final evaluation done, the process shutting
    down, which takes seconds) is absorbed: the exit code stays 0, not 128 + SIGUSR1."""
    run = tmp_path / "run"
    proc = TrainProcess(args=[*BASE_ARGS, "--steps", "20", "--run-dir", str(run)],
                        log=tmp_path / "run.log")
    deadline = time.monotonic() + START_TIMEOUT
    while not [r for r in read_metrics(run) if r["event"] == "summary"]:
        assert proc.proc.poll() is None and time.monotonic() < deadline, proc.output()[-3000:]
        time.sleep(0.02)
    # Still a live process (not a zombie): the signal reaches it, during its shutdown.
    state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    assert proc.proc.poll() is None and state != "Z", state
    proc.proc.send_signal(signal.SIGUSR1)
    code = proc.wait(timeout=STOP_TIMEOUT)
    out = proc.output()
    assert code == EXIT_OK, out[-3000:]
    assert checkpoint_steps(run) == [20]


@pytest.mark.timeout(200)
def test_second_sigterm_exits_immediately_with_143(tmp_path: Path) -> None:
    """Two SIGTERMs: the second one exits at once, without waiting for the step boundary."""
    run = tmp_path / "run"
    # 2 s between steps: both signals arrive well inside one sleep, long before a checkpoint.
    proc = TrainProcess(args=[*ENDLESS, "--run-dir", str(run), "--step-sleep", "2"],
                        log=tmp_path / "run.log")
    wait_for_step(proc, run, 1, timeout=START_TIMEOUT)
    proc.proc.send_signal(signal.SIGTERM)
    # Apart, not back to back: two pending standard signals of one kind merge into one.
    time.sleep(0.3)
    sent = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=STOP_TIMEOUT)
    took = time.monotonic() - sent
    out = proc.output()
    assert code == EXIT_IMMEDIATE == 143, out[-3000:]
    assert "second SIGTERM: exiting now" in out, out[-3000:]
    assert took < 1.5, took  # the step boundary was ~1.7 s away
    assert checkpoint_steps(run) == [], checkpoint_steps(run)


@pytest.mark.timeout(200)
def test_stop_after_checkpoints_and_exits_99(tmp_path: Path) -> None:
    """--stop-after S: checkpoint and exit 99 once the process is S seconds old."""
    run = tmp_path / "run"
    stop_after = 6.0
    proc = TrainProcess(args=[*ENDLESS, "--run-dir", str(run), "--step-sleep", "0.05",
                              "--stop-after", str(stop_after)], log=tmp_path / "run.log")
    code = proc.wait(timeout=START_TIMEOUT)
    took = time.monotonic() - proc.started
    out = proc.output()
    assert code == EXIT_REQUEUE, out[-3000:]
    assert "received" not in out, out[-3000:]  # no signal involved
    stopped = _stopped_at(run, out)
    assert stopped >= 1 and train_steps(run)[-1] == stopped, (stopped, train_steps(run))
    # Counted from the process start (imports, data loading included), as a walltime is.
    assert stop_after <= took < stop_after + 10, took


@pytest.mark.timeout(400)
def test_mpirun_forwards_sigusr1_and_resume_equals_uninterrupted_run(tmp_path: Path) -> None:
    """SIGUSR1 to mpirun reaches both ranks; they stop together; the resume is bitwise exact."""
    reference = tmp_path / "reference"
    code, out = run_training([*ARGS, "--run-dir", str(reference)], log=tmp_path / "ref.log",
                             ranks=2)
    assert code == EXIT_OK, out[-3000:]

    run = tmp_path / "run"
    proc = TrainProcess(args=[*ARGS, "--run-dir", str(run), "--step-sleep", "0.1"],
                        log=tmp_path / "run.log", ranks=2)
    wait_for_step(proc, run, 10, timeout=START_TIMEOUT)
    proc.proc.send_signal(signal.SIGUSR1)
    out, stopped = _wait_requeued(proc, run)
    # mpirun passed the signal on to every rank (two distinct pids noted it).
    assert len(set(re.findall(r"pid (\d+)\] received SIGUSR1", out))) == 2, out[-3000:]
    assert stopped < STEPS

    code, out = run_training([*ARGS, "--run-dir", str(run)], log=tmp_path / "resume.log",
                             ranks=2)
    assert code == EXIT_OK, out[-3000:]
    assert f"at step {stopped} (written on 2 ranks" in out, out[-3000:]
    compared = assert_same_final_state(reference, run)
    print(f"2 ranks, SIGUSR1 to mpirun at step {stopped} of {STEPS}: resumed run equals the "
          f"uninterrupted one ({compared} checkpoint entries, bitwise)")


@pytest.mark.timeout(200)
@pytest.mark.parametrize("signalled_rank", [1])
def test_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path,
                                                              signalled_rank: int) -> None:
    """Only one rank gets SIGUSR1 (os.kill on its pid): all ranks checkpoint the same step."""
    run = tmp_path / "run"
    proc = TrainProcess(args=[*ENDLESS, "--run-dir", str(run), "--step-sleep", "0.05"],
                        log=tmp_path / "run.log", ranks=2)
    pids = proc.rank_pids(2)
    wait_for_step(proc, run, 3, timeout=START_TIMEOUT)
    os.kill(pids[signalled_rank], signal.SIGUSR1)
    out, stopped = _wait_requeued(proc, run)
    assert re.findall(r"pid (\d+)\] received SIGUSR1", out) == [str(pids[signalled_rank])], \
        out[-3000:]
    # The checkpoint is collective: one directory with both ranks' shards at one step.
    (info,) = list_checkpoints(run)
    assert info.world_size == 2 and info.valid, info
    assert sorted(p.name for p in info.path.glob("shard-*.h5")) == [
        "shard-00000-of-00002.h5", "shard-00001-of-00002.h5"]
    # Every rank that got to log its stop line (mpirun may kill the slower one once the
    # first exits with 99) names that same step.
    per_rank = re.findall(r"\[rank (\d)\] WARNING stop requested .*? checkpoint at step "
                          r"(\d+) written", out)
    assert ("0", str(stopped)) in per_rank and {s for _, s in per_rank} == {str(stopped)}, \
        out[-3000:]
    assert train_steps(run)[-1] == stopped
