"""The batch scripts in ``jobs/``, submitted for real to the local SLURM cluster and PBS front end.

* ``sbatch jobs/slurm_srun.sbatch``, ``sbatch jobs/slurm_mpirun.sbatch`` and ``qsub jobs/pbs.qsub``
  each train a short 2-rank run to the end.
* End to end, the time limit's warning signal really arrives (``--signal=USR1@35`` for srun
  ranks, ``--signal=B:USR1@35`` forwarded by the batch shell to mpirun): the job checkpoints,
  exits 99, requeues itself, resumes (``SLURM_RESTART_COUNT=1``) and finishes in the bitwise same
  state as an uninterrupted ``mpirun -np 2`` run of the same arguments. The observed timeline
  (signal -> checkpoint -> requeue -> resume -> finish) is printed.
* PBS walltime cycle: ``qsub -l ...,walltime=00:02:00`` with ``MLBFGS_MARGIN=60``: the script
  derives ``--stop-after 60`` from ``qstat -f``, the ranks checkpoint and exit 99, the script
  resubmits itself with ``qsub`` and the continuation finishes, again bitwise equal.
* PINN tasks run through the same scripts unchanged: ``--pde poisson`` with the line-searched
  mL-BFGS on 2 ranks under each script finishes with ``rel_l2`` evaluations, closure counts and
  a final checkpoint; and ``scancel --signal=USR1`` on the srun job's ranks makes it checkpoint,
  exit 99, requeue and resume, ending bitwise where an uninterrupted ``mpirun -np 2`` run ends.

Every job is submitted at once by a module fixture, so their waits overlap; ``--step-sleep``
stretches the cycle runs to 1-1.5 minutes of training without changing the mathematics.

Why ``--time=2 --signal=USR1@35``: slurmctld checks warning times on a 30 s tick and sends the
signal at the first tick with at most N + 30 = 65 s left, i.e. 55-85 s after the start; the
training (~95 s) is still running then, whatever the tick's phase. The requeued run starts
~10 s after that tick (ranks exit, requeue delay), so its own warning comes three ticks after
the first, ~80 s into it: time for the rest (at most ~55 s here; 75 s on a slower CI machine, whose
warning then came 2 s after the last step, while the ranks shut down: tolerated). Measured with
``--signal=USR1@65`` (25-55 s): the second run is warned ~50 s in, and with ``--time=1
--signal=USR1@20`` (10-40 s) ~20 s in, too early to finish; both needed two or more requeues.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import (  # noqa: F401  (fixture import)
    TERMINAL_STATES,
    SlurmCluster,
    slurm_cluster,
)
from tests.train_runs import (
    BASE_ARGS,
    REPO,
    assert_same_final_state,
    checkpoint_steps,
    read_metrics,
    run_training,
    train_env,
    train_steps,
)

JOBS = REPO / "jobs"
SHORT_ARGS = [*BASE_ARGS, "--steps", "40"]
# The signal/walltime runs: 300 x (sleep + 0.01-0.04 s compute) of training; the sleep
# dominates, so the length hardly depends on the machine's load (see the docstring).
CYCLE_STEPS = 300
CYCLE_ARGS = [*BASE_ARGS, "--steps", str(CYCLE_STEPS), "--log-every", "20"]
SLURM_SLEEP = "0.3"  # 93-102 s: running at the latest signal (85 s), the rest fits in 80 s
PBS_SLEEP = "0.2"  # 63-72 s: longer than --stop-after 60, the rest fits in the next 60 s
TIME_LIMIT = "--time=2"
SIGNAL_LEAD_S = 35
SHORT_TIMEOUT = 240.0
CYCLE_TIMEOUT = 420.0
# A small Poisson PINN (400 + 80 points: equal shards on 2 ranks) with the line-searched
# mL-BFGS; --max-iter 4 keeps a step ~0.5 s of compute so the jobs barely load the machine
# beside the sleep-dominated cycle runs.
PINN_ARGS = ["--pde", "poisson", "--collocation", "400", "--boundary-points", "80",
             "--width", "16", "--depth", "2", "--optimizer", "mlbfgs",
             "--line-search", "strong_wolfe", "--max-iter", "4", "--quiet"]
PINN_STEPS = 5
# The requeue run: 12 steps of ~2.5 s, signalled by the test once step 2 is logged.
PINN_REQUEUE_STEPS = 12
PINN_REQUEUE_ARGS = [*PINN_ARGS, "--steps", str(PINN_REQUEUE_STEPS)]
PINN_SLEEP = "2"


def _job_env(run_dir: Path, **extra: str) -> dict[str, str]:
    """What the scripts read (MLBFGS_*) plus MPI-as-root settings; sbatch/qsub -V export it."""
    env = train_env(MLBFGS_REPO=str(REPO), MLBFGS_PYTHON=sys.executable,
                    MLBFGS_RUN_DIR=str(run_dir))
    env.update(extra)
    return env


def _sbatch(cluster: SlurmCluster, script: str, options: list[str], train_args: list[str], *,
            work: Path, name: str) -> str:
    """``sbatch --parsable OPTIONS jobs/SCRIPT TRAIN_ARGS`` (output to WORK/NAME.out)."""
    proc = cluster.run(["sbatch", "--parsable", "-n", "2", "-J", name, "-o",
                        str(work / f"{name}.out"), *options, str(JOBS / script), *train_args],
                       env=_job_env(work / name), cwd=work)
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit(), (proc.stdout, proc.stderr)
    return job_id


def _qsub(cluster: SlurmCluster, resources: str, train_args: list[str], *, work: Path,
          name: str, **extra: str) -> str:
    """``qsub -V -l RESOURCES jobs/pbs.qsub`` with MLBFGS_ARGS in the exported environment.

    Slurm's qsub wrapper passes ``-v`` values to sbatch through a shell, unquoted (spaces
    break) and as ``--export=none,...`` (the job loses PATH); ``-V`` exports everything.
    """
    return cluster.qsub(JOBS / "pbs.qsub", "-V", "-N", name, "-j", "oe", "-o",
                        str(work / f"{name}.out"), "-l", resources,
                        env=_job_env(work / name, MLBFGS_ARGS=" ".join(train_args), **extra),
                        cwd=work)


@pytest.fixture(scope="module")
def jobs(slurm_cluster: SlurmCluster,  # noqa: F811  (the imported fixture)
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Submit every job of this module at once; yield ``{name: job id, "work": dir}``."""
    work = tmp_path_factory.mktemp("jobs")
    ids = {
        # First, so it takes the free slot beside the cycle runs at once: the first test
        # signals it while it runs.
        "pinn_requeue": _sbatch(slurm_cluster, "slurm_srun.sbatch", [],
                                [*PINN_REQUEUE_ARGS, "--step-sleep", PINN_SLEEP], work=work,
                                name="pinn_requeue"),
        "e2e_srun": _sbatch(slurm_cluster, "slurm_srun.sbatch",
                            [TIME_LIMIT, f"--signal=USR1@{SIGNAL_LEAD_S}"],
                            [*CYCLE_ARGS, "--step-sleep", SLURM_SLEEP], work=work,
                            name="e2e_srun"),
        "e2e_mpirun": _sbatch(slurm_cluster, "slurm_mpirun.sbatch",
                              [TIME_LIMIT, f"--signal=B:USR1@{SIGNAL_LEAD_S}"],
                              [*CYCLE_ARGS, "--step-sleep", SLURM_SLEEP], work=work,
                              name="e2e_mpirun"),
        "pbs_cycle": _qsub(slurm_cluster, "select=1:ncpus=2:mpiprocs=2,walltime=00:02:00",
                           [*CYCLE_ARGS, "--step-sleep", PBS_SLEEP], work=work,
                           name="pbs_cycle", MLBFGS_MARGIN="60"),
        "srun": _sbatch(slurm_cluster, "slurm_srun.sbatch", [], SHORT_ARGS, work=work,
                        name="srun"),
        "mpirun": _sbatch(slurm_cluster, "slurm_mpirun.sbatch", [], SHORT_ARGS, work=work,
                          name="mpirun"),
        "pbs": _qsub(slurm_cluster, "select=1:ncpus=2:mpiprocs=2,walltime=00:05:00",
                     SHORT_ARGS, work=work, name="pbs", MLBFGS_RESUBMIT="0"),
        "pinn_srun": _sbatch(slurm_cluster, "slurm_srun.sbatch", [],
                             [*PINN_ARGS, "--steps", str(PINN_STEPS)], work=work,
                             name="pinn_srun"),
        "pinn_mpirun": _sbatch(slurm_cluster, "slurm_mpirun.sbatch", [],
                               [*PINN_ARGS, "--steps", str(PINN_STEPS)], work=work,
                               name="pinn_mpirun"),
        "pinn_pbs": _qsub(slurm_cluster, "select=1:ncpus=2:mpiprocs=2,walltime=00:05:00",
                          [*PINN_ARGS, "--steps", str(PINN_STEPS)], work=work,
                          name="pinn_pbs", MLBFGS_RESUBMIT="0"),
    }
    yield {**ids, "work": str(work)}
    # Cancel whatever is left, continuations the PBS script queued included.
    queued = [j for out in work.glob("*.o*")
              for j in _continuations(out.read_text(errors="replace"))]
    for job_id in [*ids.values(), *queued]:
        slurm_cluster.cancel(job_id)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run of CYCLE_ARGS: ``mpirun -np 2`` directly, 1 thread per rank
    (as in the jobs: thread counts may change the rounding of reductions), no sleep."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    code, out = run_training([*CYCLE_ARGS, "--threads", "1", "--run-dir", str(run_dir)],
                             log=run_dir.parent / "reference.log", ranks=2, timeout=300)
    assert code == 0, out[-3000:]
    return run_dir


def _continuations(output: str) -> list[str]:
    return re.findall(r"continuation queued as job (\S+)", output)


def _wait_ok(cluster: SlurmCluster, job_id: str, out_file: Path, *, timeout: float) -> str:
    """Wait for the job; assert it COMPLETED with exit 0; return its output."""
    result = cluster.wait_for(job_id, timeout=timeout)
    out = out_file.read_text(errors="replace") if out_file.exists() else "<no output file>"
    assert result.ok, f"job {job_id}: {result.state} exit={result.exit_code}\n{out[-4000:]}"
    return out


def _wait_for_train_step(cluster: SlurmCluster, job_id: str, run_dir: Path, step: int, *,
                         timeout: float) -> None:
    """Wait until the running job's ``metrics.jsonl`` has a train record at ``step`` or later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = train_steps(run_dir)
        if steps and steps[-1] >= step:
            return
        state = cluster.state(job_id)
        assert state not in TERMINAL_STATES, f"job {job_id} ended ({state}) before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: no train record at step >= {step} after {timeout:.0f} s"
                         f" (state {cluster.state(job_id)})")


def _assert_trained(out: str, run_dir: Path, steps: int) -> None:
    """The run's summary: exit 0 from the launcher, the done line, a 2-rank summary record."""
    assert "training exited with 0" in out, out[-3000:]
    assert re.search(rf"INFO done: {steps} steps, test accuracy", out), out[-3000:]
    summary = read_metrics(run_dir)[-1]
    assert summary["event"] == "summary" and summary["world_size"] == 2, summary
    assert summary["step"] == steps and summary["test_accuracy"] > 0.5, summary


# ---- PINN tasks through the same scripts ------------------------------------------------------
def _assert_pinn_trained(out: str, run_dir: Path, steps: int) -> list[dict]:
    """Exit 0; a ``rel_l2`` evaluation and a closure count at every step; a final checkpoint."""
    assert "training exited with 0" in out, out[-3000:]
    assert re.search(rf"INFO done: {steps} steps, relative L2 error \S+, \d+ closure "
                     r"evaluations", out), out[-3000:]
    metrics = read_metrics(run_dir)
    evals = [r for r in metrics if r["event"] == "eval"]
    assert [r["step"] for r in evals] == list(range(1, steps + 1)), evals
    rel_l2 = [r["rel_l2"] for r in evals]
    assert all(math.isfinite(e) and e > 0 for e in rel_l2) and rel_l2[-1] < rel_l2[0], rel_l2
    func_evals = [r["func_evals"] for r in metrics if r["event"] == "train"]
    # Strictly increasing, and more than one evaluation per step: the line search searched.
    assert len(func_evals) == steps and func_evals == sorted(set(func_evals)), func_evals
    assert func_evals[-1] > steps, func_evals
    summary = metrics[-1]
    assert summary["event"] == "summary" and summary["world_size"] == 2, summary
    assert summary["step"] == steps and summary["pde"] == "poisson", summary
    assert summary["optimizer"] == "mlbfgs", summary
    assert summary["total_func_evals"] == func_evals[-1], summary
    assert summary["rel_l2"] == pytest.approx(rel_l2[-1]), summary
    assert checkpoint_steps(run_dir)[-1] == steps, checkpoint_steps(run_dir)
    return metrics


# Runs first: it signals the job while the job trains (the fixture submits it first).
@pytest.mark.timeout(SHORT_TIMEOUT + 300)
def test_pinn_srun_job_signal_requeue_resume(slurm_cluster: SlurmCluster,  # noqa: F811
                                             jobs: dict[str, str], tmp_path: Path) -> None:
    """scancel --signal=USR1 on the ranks of a PINN srun job: checkpoint, 99, requeue, resume."""
    work = Path(jobs["work"])
    job_id, run_dir = jobs["pinn_requeue"], work / "pinn_requeue"
    _wait_for_train_step(slurm_cluster, job_id, run_dir, 2, timeout=SHORT_TIMEOUT)
    # Without --batch/--full, scancel signals the job's steps (srun's ranks), not the shell.
    slurm_cluster.run(["scancel", "--signal=USR1", job_id])
    # The uninterrupted run, while the job checkpoints, requeues and resumes.
    reference = tmp_path / "reference"
    code, ref_out = run_training([*PINN_REQUEUE_ARGS, "--threads", "1", "--run-dir",
                                  str(reference)], log=tmp_path / "reference.log", ranks=2,
                                 timeout=300)
    assert code == 0, ref_out[-3000:]
    out = _wait_ok(slurm_cluster, job_id, work / "pinn_requeue.out", timeout=SHORT_TIMEOUT)
    events = timeline(out)
    _print_timeline(f"sbatch -n 2 jobs/slurm_srun.sbatch --pde poisson ... (job {job_id}, "
                    f"{PINN_REQUEUE_STEPS} steps, --step-sleep {PINN_SLEEP}), scancel "
                    f"--signal=USR1 after step 2:", events)
    step = _assert_cycle(events, requeue_event="requeue", steps=PINN_REQUEUE_STEPS)
    assert 2 <= step < PINN_REQUEUE_STEPS, events
    signals = [d for _, n, d in events if n == "rank got signal"]
    assert signals == ["SIGUSR1", "SIGUSR1"], events   # both ranks, once
    assert f"job {job_id} start, restart count 1," in out, out[-3000:]
    metrics = _assert_pinn_trained(out, run_dir, PINN_REQUEUE_STEPS)
    # The continuation counts on from the checkpoint's closure evaluations.
    assert step in checkpoint_steps(run_dir), checkpoint_steps(run_dir)
    evals = [r["func_evals"] for r in metrics if r["event"] == "train"]
    reference_evals = [r["func_evals"] for r in read_metrics(reference) if r["event"] == "train"]
    assert evals == reference_evals, (evals, reference_evals)
    compared = assert_same_final_state(reference, run_dir)
    print(f"  checkpoint at step {step}, resumed; final state equals the uninterrupted "
          f"mpirun -np 2 run ({compared} entries, bitwise)")


@pytest.mark.timeout(SHORT_TIMEOUT + 30)
@pytest.mark.parametrize("name", ["pinn_srun", "pinn_mpirun", "pinn_pbs"])
def test_pinn_task_runs_under_each_script(slurm_cluster: SlurmCluster,  # noqa: F811
                                          jobs: dict[str, str], name: str) -> None:
    """jobs/{slurm_srun,slurm_mpirun}.sbatch and jobs/pbs.qsub with --pde poisson, 2 ranks."""
    work = Path(jobs["work"])
    out = _wait_ok(slurm_cluster, jobs[name], work / f"{name}.out", timeout=SHORT_TIMEOUT)
    started = (rf"PBS job {jobs[name]}: 2 ranks on" if name == "pinn_pbs" else
               rf"job {jobs[name]} start, restart count 0, 2 ranks on")
    assert re.search(started, out), out[-3000:]
    _assert_pinn_trained(out, work / name, PINN_STEPS)


# ---- short runs ------------------------------------------------------------------------------
@pytest.mark.timeout(SHORT_TIMEOUT + 30)
@pytest.mark.parametrize("name", ["srun", "mpirun"])
def test_sbatch_script_trains(slurm_cluster: SlurmCluster,  # noqa: F811
                              jobs: dict[str, str], name: str) -> None:
    """sbatch -n 2 jobs/slurm_{srun,mpirun}.sbatch ARGS: 2 ranks train to the end, exit 0."""
    work = Path(jobs["work"])
    out = _wait_ok(slurm_cluster, jobs[name], work / f"{name}.out", timeout=SHORT_TIMEOUT)
    assert re.search(rf"job {jobs[name]} start, restart count 0, 2 ranks on \S+, run dir "
                     rf"{re.escape(str(work / name))}", out), out[-3000:]
    _assert_trained(out, work / name, 40)


@pytest.mark.timeout(SHORT_TIMEOUT + 30)
def test_qsub_pbs_script_trains(slurm_cluster: SlurmCluster,  # noqa: F811
                                jobs: dict[str, str]) -> None:
    """qsub -l select=1:ncpus=2:mpiprocs=2,walltime=00:05:00 jobs/pbs.qsub: PBS vars, 2 ranks."""
    work = Path(jobs["work"])
    out = _wait_ok(slurm_cluster, jobs["pbs"], work / "pbs.out", timeout=SHORT_TIMEOUT)
    # PBS_JOBID, the node file and the walltime (from `qstat -f`) as the script saw them.
    assert re.search(rf"PBS job {jobs['pbs']}: 2 ranks on \S+", out), out[-3000:]
    assert "walltime 300s: checkpoint and stop after 180s" in out, out[-3000:]
    _assert_trained(out, work / "pbs", 40)


# ---- the signal -> checkpoint -> requeue -> resume cycle ---------------------------------------
_EVENTS: tuple[tuple[str, str], ...] = (
    ("start", r"\[(\d\d:\d\d:\d\d)\] job \d+ start, (restart count \d+)"),
    ("start", r"\[(\d\d:\d\d:\d\d)\] PBS (job \S+): \d+ ranks"),
    ("batch shell got SIGUSR1", r"\[(\d\d:\d\d:\d\d)\] SIGUSR1: forwarding to mpirun()"),
    ("rank got signal", r"\[mlbfgs-hpc (\d\d:\d\d:\d\d\.\d+) pid \d+\] received (SIG\w+)"),
    ("checkpoint written, step", r"(\d\d:\d\d:\d\d) \[rank 0\] WARNING stop requested .*? "
                                 r"checkpoint at step (\d+)"),
    ("training exited with", r"\[(\d\d:\d\d:\d\d)\] training exited with (\d+)"),
    ("requeue", r"\[(\d\d:\d\d:\d\d)\] requeueing job()"),
    ("resubmit", r"\[(\d\d:\d\d:\d\d)\] continuation queued as (job \S+)"),
    ("resumed at step", r"(\d\d:\d\d:\d\d) \[rank 0\] INFO resumed from \S+ at step (\d+)"),
    ("done, steps", r"(\d\d:\d\d:\d\d) \[rank 0\] INFO done: (\d+) steps"),
)

_SIGNAL_EVENTS = frozenset({"batch shell got SIGUSR1", "rank got signal"})


def timeline(out: str) -> list[tuple[float, str, str]]:
    """``(seconds since the first start, event, detail)`` for the cycle's lines, in order."""
    events: list[tuple[float, str, str]] = []
    day = 0.0
    last = None
    for line in out.splitlines():
        for name, pattern in _EVENTS:
            match = re.search(pattern, line)
            if match:
                t = dt.time.fromisoformat(match.group(1))
                secs = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6 + day
                if last is not None and secs < last - 43200:  # past midnight
                    day += 86400
                    secs += 86400
                last = secs
                events.append((secs, name, match.group(2)))
                break
    t0 = events[0][0] if events else 0.0
    return [(t - t0, name, detail) for t, name, detail in events]


def _print_timeline(title: str, events: list[tuple[float, str, str]]) -> None:
    print(f"\n{title}")
    for t, name, detail in events:
        print(f"  {t:7.2f} s  {name} {detail}".rstrip())


def _assert_cycle(events: list[tuple[float, str, str]], *, requeue_event: str,
                  steps: int = CYCLE_STEPS) -> int:
    """One stop/continue cycle in the right order; return the checkpoint step."""
    names = [name for _, name, _ in events]
    # First run: started, (signalled,) checkpointed, exited 99, requeued/resubmitted.
    first = names.index("checkpoint written, step")
    step = int(events[first][2])
    assert names[0] == "start" and "start" not in names[1:first], events
    assert events[first + 1][1:] == ("training exited with", "99"), events
    assert events[first + 2][1] == requeue_event, events
    # The continuation resumes at exactly that step and, in the end, finishes.
    resumed = names.index("resumed at step")
    assert resumed > first + 2 and events[resumed][2] == str(step), events
    # The continuation's own warning may land after its last step, while the ranks shut down
    # (seen in CI: done at 75 s, warned at 77 s): harmless when it finished and exited 0, so
    # signal lines after "done" are ignored; a warning before it would show as a second cycle.
    done = names.index("done, steps")
    assert events[done][2] == str(steps), events
    after_done = [name for name in names[done + 1:] if name not in _SIGNAL_EVENTS]
    assert after_done == ["training exited with"], events
    assert events[-1][1:] == ("training exited with", "0"), events
    times = [t for t, _, _ in events]
    # In order, up to the 1 s resolution of most time stamps (signal stamps have 1 ms).
    assert all(b >= a - 1.0 for a, b in zip(times, times[1:])), events
    return step


@pytest.mark.timeout(CYCLE_TIMEOUT + 60)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_time_limit_signal_checkpoint_requeue_resume(
        slurm_cluster: SlurmCluster,  # noqa: F811
        jobs: dict[str, str], reference: Path, launcher: str) -> None:
    """--time=2 --signal=[B:]USR1@35: checkpoint, exit 99, requeue, resume, bitwise result."""
    name = f"e2e_{launcher}"
    work = Path(jobs["work"])
    job_id = jobs[name]
    out = _wait_ok(slurm_cluster, job_id, work / f"{name}.out", timeout=CYCLE_TIMEOUT)
    events = timeline(out)
    _print_timeline(f"sbatch -n 2 {TIME_LIMIT} --signal={'B:' if launcher == 'mpirun' else ''}"
                    f"USR1@{SIGNAL_LEAD_S} jobs/slurm_{launcher}.sbatch (job {job_id}, "
                    f"{CYCLE_STEPS} steps, --step-sleep {SLURM_SLEEP}):", events)
    step = _assert_cycle(events, requeue_event="requeue")
    assert 0 < step < CYCLE_STEPS
    assert f"job {job_id} start, restart count 1," in out, out[-3000:]
    first_ckpt = [n for _, n, _ in events].index("checkpoint written, step")
    signals = [(t, d) for t, n, d in events[:first_ckpt] if n == "rank got signal"]
    # Both ranks were warned (srun signals each task; mpirun forwards to each rank) with SIGUSR1.
    assert [d for _, d in signals] == ["SIGUSR1", "SIGUSR1"], events
    first_signal = signals[0][0]
    # Sent at the first 30 s tick with at most 35 + 30 s left of 120: 55-85 s after the start
    # (+-2 s: the start line is printed a moment after the job starts, 1 s time stamps).
    assert 53 <= first_signal <= 90, events
    if launcher == "mpirun":
        assert "batch shell got SIGUSR1" in [n for _, n, _ in events], events
    # Checkpoints: each stop's and the final one; every continuation resumed at exactly the
    # step its stop checkpointed. A loaded machine can need more than one requeue, and the
    # run dir keeps only the newest checkpoints (seen: 68 rotated out of 122, 249, 300), so
    # the last stop's checkpoint is the one that must still be there.
    run_dir = work / name
    stops = [int(d) for _, n, d in events if n == "checkpoint written, step"]
    assert [int(d) for _, n, d in events if n == "resumed at step"] == stops, events
    assert stops == sorted(set(stops)), events
    assert stops[-1] in checkpoint_steps(run_dir), (stops, checkpoint_steps(run_dir))
    assert checkpoint_steps(run_dir)[-1] == CYCLE_STEPS
    # Metrics continue without a repeated step.
    steps = [r["step"] for r in read_metrics(run_dir) if r["event"] == "train"]
    assert steps == sorted(set(steps)), steps
    # The run held its directory's lock (one writer per run dir) and the requeued instance
    # took it again and resumed: the lock file names this job.
    assert (run_dir / "run.lock").read_text().split()[2] == job_id
    compared = assert_same_final_state(reference, run_dir)
    restarts = len(re.findall(rf"job {job_id} start, restart count", out)) - 1
    print(f"  signal {first_signal:.1f} s after the start, checkpoint at step {step}, "
          f"{restarts} requeue(s); final state equals the uninterrupted mpirun -np 2 run "
          f"({compared} entries, bitwise)")


@pytest.mark.timeout(CYCLE_TIMEOUT + 60)
def test_pbs_walltime_checkpoint_resubmit_finish(slurm_cluster: SlurmCluster,  # noqa: F811
                                                 jobs: dict[str, str], reference: Path) -> None:
    """walltime 120 s, MLBFGS_MARGIN=60: stop after 60 s, exit 99, qsub the rest, finish."""
    work = Path(jobs["work"])
    out = _wait_ok(slurm_cluster, jobs["pbs_cycle"], work / "pbs_cycle.out",
                   timeout=CYCLE_TIMEOUT)
    assert "walltime 120s: checkpoint and stop after 60s" in out, out[-3000:]
    outputs = [out]
    # Follow the chain of continuations (normally one) to the job that finished.
    while continuation := _continuations(outputs[-1]):
        assert len(outputs) < 5, "more than 4 continuations"
        next_id = continuation[0]
        outputs.append(_wait_ok(slurm_cluster, next_id, work / f"pbs_cycle.o{next_id}",
                                timeout=CYCLE_TIMEOUT))
        # The continuation got the same resources and the exported MLBFGS_* settings.
        assert "walltime 120s: checkpoint and stop after 60s" in outputs[-1], outputs[-1]
        assert re.search(rf"PBS job {next_id}: 2 ranks on", outputs[-1]), outputs[-1]
    assert len(outputs) >= 2, out[-3000:]
    events = timeline("\n".join(outputs))
    _print_timeline(f"qsub -l select=1:ncpus=2:mpiprocs=2,walltime=00:02:00 jobs/pbs.qsub, "
                    f"MLBFGS_MARGIN=60 ({CYCLE_STEPS} steps, --step-sleep {PBS_SLEEP}):",
                    events)
    step = _assert_cycle(events, requeue_event="resubmit")
    assert "rank got signal" not in [n for _, n, _ in events], events  # --stop-after, no signal
    run_dir = work / "pbs_cycle"
    assert step in checkpoint_steps(run_dir) and checkpoint_steps(run_dir)[-1] == CYCLE_STEPS
    compared = assert_same_final_state(reference, run_dir)
    print(f"  stopped at step {step}, {len(outputs) - 1} continuation(s); final state equals "
          f"the uninterrupted run ({compared} entries, bitwise)")
