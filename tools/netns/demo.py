"""The node-loss drill behind ``python tools/netns_cluster.py demo``.

A 4-rank training job (``python -m mlbfgs_hpc``, Horovod gradient allreduce) runs on two
namespace hosts with its run directory on the shared file system and a checkpoint every
``checkpoint_every`` steps. Once ``metrics.jsonl`` shows step ``kill_after``, every process of
host 1 is killed (node loss). ``mpirun`` on host 0 must then end by itself, non-zero, within
``exit_bound_s``; the job is restarted on host 0 alone (2 ranks), resumes from the newest valid
checkpoint and runs to the end. What is lost is exactly the steps after that checkpoint.

:func:`run_node_loss_drill` does this on a cluster that is already up and returns a
:class:`DrillReport` with the timeline (seconds after the kill)::

    kill ─► mpirun exits (non-zero) ─► restart launched ─► "resumed at step N" ─► 1st step

Everything the drill waits for has a deadline; a missed one raises :class:`DrillError` after
killing what the drill started. Narration goes through the ``say`` callback (the CLI prints
it); the module itself never prints.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

#: Environment Open MPI needs when the drill runs as root (namespaces need root anyway).
MPI_ROOT_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
_RESUMED_RE = re.compile(r"resumed from (\S+) at step (\d+)")
_POLL_S = 0.05


class DrillError(RuntimeError):
    """The drill did not go as a node loss must go (a hang, a wrong exit code, no resume)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class DrillReport:
    """What happened in one node-loss drill.

    Args:
        run_dir: the shared run directory (metrics.jsonl, checkpoints/).
        steps: total optimizer steps of the run.
        checkpoint_every: checkpoint period in steps.
        kill_after: host 1 was killed once metrics.jsonl showed a step >= this.
        last_step_before_kill: newest step metrics.jsonl showed when the kill was issued.
        killed_processes: processes killed on host 1 (holder, Open MPI daemon, ranks, ...).
        first_rc: exit status of the first mpirun (non-zero when the loss was noticed).
        survivor_leftovers: processes other than its holder left on host 0 after mpirun
            exited (waited for up to 5 s; 0: no rank hangs on the survivor).
        newest_checkpoint_step: newest valid checkpoint's step before the restart.
        newest_checkpoint_world_size: ranks that wrote it.
        resumed_step: the step the restart resumed at (from its log).
        lost_steps: ``last_step_before_kill - resumed_step``: work done twice.
        restart_rc: exit status of the restart.
        final_step: step of the run's final summary line.
        final_world_size: ranks of the restart.
        test_accuracy: final test accuracy of the resumed run.
        timeline: seconds after the kill: ``mpirun_exit``, ``restart_launched``,
            ``resumed`` (log line seen), ``first_step`` (first new metrics line), ``finished``;
            and ``job_start_to_kill`` (from the first launch to the kill).
    """

    run_dir: str
    steps: int
    checkpoint_every: int
    kill_after: int
    last_step_before_kill: int
    killed_processes: int
    first_rc: int
    survivor_leftovers: int
    newest_checkpoint_step: int | None
    newest_checkpoint_world_size: int | None
    resumed_step: int | None
    lost_steps: int | None
    restart_rc: int
    final_step: int | None
    final_world_size: int | None
    test_accuracy: float | None
    timeline: dict[str, float]

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(dataclasses.asdict(self), indent=2)


def _metrics(path: Path) -> list[dict[str, Any]]:
    """The complete lines of ``metrics.jsonl`` (a line being written is skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # partially written last line
    return records


def _last_train_step(records: Sequence[dict[str, Any]]) -> int:
    steps = [int(r["step"]) for r in records if r.get("event") == "train"]
    return steps[-1] if steps else 0


def _leftovers(cluster: Any, index: int, *, wait_s: float) -> list[int]:
    """Pids on host ``index`` other than its holder, after waiting up to ``wait_s`` for them
    to go."""
    deadline = time.monotonic() + wait_s
    while True:
        holder = cluster.holder_pids.get(index)
        pids = [p for p in _netns_pids(cluster.hosts[index].netns) if p != holder]
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.1)


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         timeout=30).stdout
    return [int(t) for t in out.split() if t.isdigit()]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """End ``proc`` and its process group (mpirun, timeout, agent) if it still runs."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _launch(argv: Sequence[str], log: IO[bytes], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own process group, so a failed drill can end the launcher and everything it started.
    return subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL, start_new_session=True)


def training_args(*, run_dir: Path, steps: int, checkpoint_every: int,
                  step_sleep: float) -> list[str]:
    """``mlbfgs_hpc`` arguments of the drill: a small MLP on synthetic data, one metrics line
    per step (so the kill step and the first resumed step are seen exactly)."""
    return ["--model", "mlp", "--dataset", "synthetic", "--batch-size", "64",
            "--steps", str(steps), "--checkpoint-every", str(checkpoint_every), "--keep", "3",
            "--log-every", "1", "--eval-every", "0", "--step-sleep", f"{step_sleep:g}",
            "--threads", "1", "--quiet", "--resume", "auto", "--run-dir", str(run_dir)]


def run_node_loss_drill(
    cluster: Any,
    *,
    run_dir: str | os.PathLike[str],
    steps: int = 80,
    checkpoint_every: int = 20,
    kill_after: int = 45,
    step_sleep: float = 0.05,
    python: str = sys.executable,
    exit_bound_s: float = 30.0,
    phase_timeout_s: float = 180.0,
    say: Callable[[str], None] = lambda msg: None,
) -> DrillReport:
    """Train on hosts 0 and 1, kill host 1, restart on host 0 alone; see the module docstring.

    Args:
        cluster: a running ``NetnsCluster`` with at least 2 hosts of 2 slots.
        run_dir: run directory on the shared file system (not node-local scratch); must not
            hold checkpoints yet.
        steps: total optimizer steps, > ``kill_after``.
        checkpoint_every: checkpoint period, in [1, ``kill_after``].
        kill_after: kill host 1 once this step is in metrics.jsonl, >= 1.
        step_sleep: seconds slept per step (slows the run so the kill lands mid-run).
        python: interpreter of the ranks (one with mlbfgs_hpc, mpi4py and Horovod).
        exit_bound_s: mpirun must end within this many seconds of the kill, > 0.
        phase_timeout_s: deadline of every other wait (start-up, restart), > 0.
        say: receives one line of narration per event.

    Raises:
        ValueError: an argument is out of range.
        DrillError: mpirun hung or exited 0 after the loss, or the restart failed.
    """
    if cluster.hosts_count < 2 or cluster.slots < 2:
        raise ValueError(f"cluster must have >= 2 hosts of >= 2 slots, got "
                         f"{cluster.hosts_count} x {cluster.slots}")
    if not 1 <= kill_after < steps:
        raise ValueError(f"kill_after must be in [1, steps), got {kill_after} (steps={steps})")
    if not 1 <= checkpoint_every <= kill_after:
        raise ValueError(f"checkpoint_every must be in [1, kill_after={kill_after}], "
                         f"got {checkpoint_every}")
    if not (exit_bound_s > 0 and phase_timeout_s > 0 and step_sleep >= 0):
        raise ValueError("exit_bound_s and phase_timeout_s must be > 0 and step_sleep >= 0, "
                         f"got {exit_bound_s}, {phase_timeout_s}, {step_sleep}")
    from mlbfgs_hpc import checkpoint as ckpt  # the drill is about this package's training

    run_dir = Path(run_dir).absolute()
    if ckpt.list_checkpoints(run_dir, check=False):
        raise ValueError(f"run_dir {run_dir} already holds checkpoints; give a fresh one")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.jsonl"
    env = {**os.environ, **MPI_ROOT_ENV, "OMP_NUM_THREADS": "1"}
    args = [python, "-u", "-m", "mlbfgs_hpc",
            *training_args(run_dir=run_dir, steps=steps, checkpoint_every=checkpoint_every,
                           step_sleep=step_sleep)]
    limit = phase_timeout_s + 60  # mpirun's own timeout inside host 0: never outlives us
    h0, h1 = cluster.hosts[0], cluster.hosts[1]

    # ---- phase 1: 4 ranks on 2 hosts ---------------------------------------------------
    first_log = run_dir / "mpirun-1.log"
    argv = cluster.mpirun_cmd(2 * cluster.slots, args, hosts=[0, 1], timeout_s=limit,
                              forward=["PYTHONPATH"])
    say(f"launching {2 * cluster.slots} ranks: {cluster.slots} on {h0.name} ({h0.address}), "
        f"{cluster.slots} on {h1.name} ({h1.address}); Horovod allreduce over TCP between "
        f"the hosts; checkpoint every {checkpoint_every} steps to {run_dir} (shared)")
    t_launch = time.monotonic()
    with first_log.open("wb") as log:
        proc = _launch(argv, log, env)
    try:
        step, shown = 0, 0
        deadline = time.monotonic() + phase_timeout_s
        while step < kill_after:
            if proc.poll() is not None:
                raise DrillError(f"training ended (rc={proc.returncode}) before step "
                                 f"{kill_after}; see {first_log}")
            if time.monotonic() > deadline:
                raise DrillError(f"step {kill_after} not reached in {phase_timeout_s:.0f} s "
                                 f"(at step {step}); see {first_log}")
            time.sleep(_POLL_S)
            records = _metrics(metrics_path)
            step = _last_train_step(records)
            if step >= shown + 10:
                shown = step - step % 10
                loss = [r["loss"] for r in records if r.get("event") == "train"][-1]
                done = [c.step for c in ckpt.list_checkpoints(run_dir, check=False)]
                say(f"  step {step:3d}  loss {loss:.4f}  checkpoints at steps {done}")

        # ---- phase 2: node loss ----------------------------------------------------------
        say(f"step {step} reached: killing every process of {h1.name} (node loss)")
        t_kill = time.monotonic()
        killed = cluster.kill_host(1)
        say(f"  killed {len(killed)} processes on {h1.name}; waiting for mpirun on {h0.name} "
            f"to notice (bound {exit_bound_s:.0f} s)")
        try:
            first_rc = proc.wait(timeout=exit_bound_s)
        except subprocess.TimeoutExpired as exc:
            raise DrillError(f"mpirun still runs {exit_bound_s:.0f} s after the node loss "
                             f"(a hang); see {first_log}") from exc
        t_exit = time.monotonic()
    finally:
        _stop(proc)
    last_seen = _last_train_step(_metrics(metrics_path))
    say(f"  mpirun exited with {first_rc} after {t_exit - t_kill:.2f} s; last step in "
        f"metrics.jsonl: {last_seen}")
    if first_rc == 0:
        raise DrillError(f"mpirun exited 0 after losing {h1.name}; see {first_log}")
    # Nothing of the job may linger on the survivor (a rank stuck in a collective would).
    leftovers = _leftovers(cluster, 0, wait_s=5.0)
    say(f"  processes of the job left on {h0.name}: {len(leftovers)}")

    # ---- phase 3: what survived on the shared file system --------------------------------
    infos = ckpt.list_checkpoints(run_dir, check=True, include_incomplete=True)
    for info in infos:
        state = ("valid" if info.valid else "INVALID") if info.complete else "incomplete"
        say(f"  {info.path.name}: {state}, written by {info.world_size} ranks"
            + (f" ({'; '.join(info.problems)})" if info.problems else ""))
    newest = ckpt.find_latest_valid(run_dir)
    newest_info = next((i for i in infos if newest is not None and i.path == newest), None)
    newest_step = newest_info.step if newest_info else None
    say(f"newest valid checkpoint: step {newest_step}; steps {newest_step}..{last_seen} "
        f"will be recomputed")

    # ---- phase 4: restart on the survivor ------------------------------------------------
    restart_log = run_dir / "mpirun-2.log"
    argv = cluster.mpirun_cmd(cluster.slots, args, hosts=[0], timeout_s=limit,
                              forward=["PYTHONPATH"])
    offset = len(_metrics(metrics_path))
    say(f"restarting on {h0.name} alone: {cluster.slots} ranks, same command, --resume auto")
    t_restart = time.monotonic()
    t_resumed = t_first = None
    resumed_step: int | None = None
    with restart_log.open("wb") as log:
        proc = _launch(argv, log, env)
    try:
        deadline = time.monotonic() + phase_timeout_s
        while proc.poll() is None:
            if time.monotonic() > deadline:
                raise DrillError(f"restart not finished in {phase_timeout_s:.0f} s; "
                                 f"see {restart_log}")
            time.sleep(_POLL_S)
            if t_resumed is None:
                match = _RESUMED_RE.search(restart_log.read_text(errors="replace"))
                if match:
                    t_resumed, resumed_step = time.monotonic(), int(match.group(2))
                    say(f"  resumed from {Path(match.group(1)).name} at step {resumed_step} "
                        f"({t_resumed - t_restart:.1f} s after the restart)")
            if t_first is None and any(r.get("event") == "train"
                                       for r in _metrics(metrics_path)[offset:]):
                t_first = time.monotonic()
                say(f"  first step after the restart done "
                    f"({t_first - t_restart:.1f} s after the restart)")
        restart_rc = proc.returncode
        t_done = time.monotonic()
    finally:
        _stop(proc)
    if t_resumed is None:  # the line may land just before the exit
        match = _RESUMED_RE.search(restart_log.read_text(errors="replace"))
        if match:
            t_resumed, resumed_step = t_done, int(match.group(2))
    if restart_rc != 0:
        raise DrillError(f"restart exited with {restart_rc}; see {restart_log}")
    summary = next((r for r in reversed(_metrics(metrics_path)[offset:])
                    if r.get("event") == "summary"), None)
    final_step = int(summary["step"]) if summary else None
    accuracy = float(summary["test_accuracy"]) if summary else None
    say(f"restart finished: step {final_step} on {summary and summary['world_size']} ranks, "
        f"test accuracy {100 * (accuracy or 0):.2f}%")
    timeline = {"job_start_to_kill": t_kill - t_launch, "mpirun_exit": t_exit - t_kill,
                "restart_launched": t_restart - t_kill, "finished": t_done - t_kill}
    if t_resumed is not None:
        timeline["resumed"] = t_resumed - t_kill
    if t_first is not None:
        timeline["first_step"] = t_first - t_kill
    return DrillReport(
        run_dir=str(run_dir), steps=steps, checkpoint_every=checkpoint_every,
        kill_after=kill_after, last_step_before_kill=last_seen, killed_processes=len(killed),
        first_rc=first_rc, survivor_leftovers=len(leftovers),
        newest_checkpoint_step=newest_step,
        newest_checkpoint_world_size=newest_info.world_size if newest_info else None,
        resumed_step=resumed_step,
        lost_steps=None if resumed_step is None else last_seen - resumed_step,
        restart_rc=restart_rc, final_step=final_step,
        final_world_size=int(summary["world_size"]) if summary else None,
        test_accuracy=accuracy, timeline={k: round(v, 3) for k, v in timeline.items()})
