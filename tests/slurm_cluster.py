"""A real single-node SLURM cluster (with its PBS/Torque front end) for tests.

The cluster is started and stopped by ``tools/slurm_local.sh``; this module wraps it for pytest:
:class:`SlurmCluster` submits jobs (``sbatch --parsable`` or ``qsub``) and waits for their final
state, and the session-scoped :func:`slurm_cluster` fixture starts the cluster once per test
session and stops it at the end, also when tests fail.

There is no accounting database (no slurmdbd, so no ``sacct``). The final state and exit code of
a job are read from ``scontrol show job`` while slurmctld still holds the record (MinJobAge) and
otherwise from the job-completion log (``jobcomp/filetxt``), which gets one line per job end,
including an intermediate ``JobState=PENDING`` line each time the job is requeued.

Use it from a test module with ``from tests.slurm_cluster import slurm_cluster`` (the fixture
must be imported into the module, or registered once via ``pytest_plugins``).

When the Slurm binaries are missing the fixture skips the tests, except under CI (environment
``CI=true``), where missing infrastructure must fail loudly instead of hiding tests.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
SLURM_LOCAL = REPO_ROOT / "tools" / "slurm_local.sh"
DEFAULT_STATE_DIR = Path(os.environ.get("MLBFGS_SLURM_DIR", "/tmp/mlbfgs-slurm"))

#: Binaries the cluster and its PBS front end need (Debian: slurm-wlm slurm-wlm-torque munge).
REQUIRED_BINARIES: tuple[str, ...] = (
    "munged",
    "munge",
    "unmunge",
    "slurmctld",
    "slurmd",
    "sbatch",
    "srun",
    "scontrol",
    "squeue",
    "sinfo",
    "scancel",
    "qsub",
    "generate_pbs_nodefile",
)

#: Job states after which a job never runs again (a requeued job goes back to PENDING instead).
TERMINAL_STATES: frozenset[str] = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)

_KEY_VALUE = re.compile(r"(\w[\w/:]*)=(\S*)")


class SlurmError(RuntimeError):
    """A Slurm command failed or a job did not reach a final state in time."""


@dataclasses.dataclass(frozen=True)
class JobResult:
    """Final outcome of a batch job.

    Attributes:
        job_id: Slurm job id (for ``qsub`` jobs the same number as ``PBS_JOBID``).
        state: Final Slurm state, e.g. ``COMPLETED``, ``FAILED``, ``TIMEOUT``, ``CANCELLED``.
        exit_code: Exit status of the batch script (the part before ``:`` in ``ExitCode``).
        signal: Signal that ended the batch script, 0 if none.
        restarts: How often the job was requeued (``SLURM_RESTART_COUNT`` of its last run).
        stdout_path: The job's standard output file, when slurmctld still knew it.
        record: Every ``key=value`` field of the record the result was read from.
    """

    job_id: str
    state: str
    exit_code: int
    signal: int
    restarts: int
    stdout_path: Path | None
    record: dict[str, str]

    @property
    def ok(self) -> bool:
        """True when the job completed with exit status 0."""
        return self.state == "COMPLETED" and self.exit_code == 0 and self.signal == 0


def _parse_record(line: str) -> dict[str, str]:
    """Split one ``scontrol -o`` / jobcomp line into its ``key=value`` fields."""
    return {key: value for key, value in _KEY_VALUE.findall(line)}


def _split_exit_code(value: str) -> tuple[int, int]:
    """``"3:0"`` -> ``(3, 0)``; a missing or odd value reads as ``(-1, 0)``."""
    status, _, sig = value.partition(":")
    try:
        return int(status), int(sig or 0)
    except ValueError:
        return -1, 0


def missing_binaries() -> list[str]:
    """Names from :data:`REQUIRED_BINARIES` that are not on ``PATH``."""
    return [name for name in REQUIRED_BINARIES if shutil.which(name) is None]


def unavailable_reason() -> str | None:
    """Why this machine cannot run the local cluster, or None when it can."""
    missing = missing_binaries()
    if missing:
        return (
            "SLURM test cluster unavailable: missing "
            + ", ".join(missing)
            + " (apt-get install -y slurm-wlm slurm-wlm-torque munge)"
        )
    if os.geteuid() != 0:
        return (
            "SLURM test cluster unavailable: tools/slurm_local.sh needs root (slurmd runs as root)"
        )
    return None


def skip_or_fail(reason: str) -> None:
    """Skip the test with ``reason``; under CI (``CI=true``) fail it, as nothing may be skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason + " [CI=true: failing instead of skipping]", pytrace=False)
    pytest.skip(reason)


def run_slurm_local(
    command: str, *, state_dir: Path, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """Run ``tools/slurm_local.sh COMMAND --state-dir STATE_DIR`` and return its result.

    Args:
        command: One of ``start``, ``stop``, ``status``, ``env``.
        state_dir: Directory holding the cluster's configs, logs and runtime state.
        timeout: Seconds before the script is killed; expiry raises ``SlurmError``.

    Raises:
        ValueError: If ``command`` is not one of the four commands.
        SlurmError: If the script runs past ``timeout``.
    """
    if command not in {"start", "stop", "status", "env"}:
        raise ValueError(f"command must be one of start|stop|status|env, got {command!r}")
    try:
        return subprocess.run(
            [str(SLURM_LOCAL), command, "--state-dir", str(state_dir)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise SlurmError(f"slurm_local.sh {command} ran past {timeout:.0f} s") from exc


class SlurmCluster:
    """Handle on a running local cluster: its environment and job helpers."""

    def __init__(self, *, state_dir: Path, command_timeout: float = 30.0) -> None:
        """Describe the cluster whose configs live in ``state_dir``.

        Args:
            state_dir: The state dir given to ``tools/slurm_local.sh`` (holds ``slurm.conf``).
            command_timeout: Seconds any single Slurm client command may take; must be > 0.

        Raises:
            ValueError: If ``command_timeout`` is not positive.
        """
        if command_timeout <= 0:
            raise ValueError(f"command_timeout must be > 0 seconds, got {command_timeout}")
        self.state_dir = Path(state_dir)
        self.conf = self.state_dir / "slurm.conf"
        self.jobcomp_log = self.state_dir / "log" / "jobcomp.txt"
        self.command_timeout = command_timeout

    @property
    def env(self) -> dict[str, str]:
        """A copy of ``os.environ`` with ``SLURM_CONF`` pointing at this cluster.

        Pass it to every ``subprocess`` call that runs a Slurm or PBS command; jobs inherit it
        (sbatch and qsub export the submitting environment), so ``scontrol`` works inside jobs.
        """
        env = dict(os.environ)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm/PBS client command against this cluster.

        Args:
            args: The command and its arguments, e.g. ``["squeue", "-h"]``.
            env: Extra environment variables on top of :attr:`env`.
            cwd: Working directory (becomes the job's submit dir for sbatch/qsub).
            check: Raise ``SlurmError`` when the command exits non-zero.

        Raises:
            SlurmError: On a non-zero exit (with ``check``) or when ``command_timeout`` expires.
        """
        full_env = self.env
        if env:
            full_env.update(env)
        try:
            proc = subprocess.run(
                list(args),
                env=full_env,
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=self.command_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(f"{shlex.join(args)} ran past {self.command_timeout:.0f} s") from exc
        if check and proc.returncode != 0:
            detail = proc.stderr.strip() or proc.stdout.strip()
            raise SlurmError(f"{shlex.join(args)} exited {proc.returncode}: {detail}")
        return proc

    def submit(
        self,
        script: Path | str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> str:
        """Submit ``script`` with ``sbatch --parsable ARGS SCRIPT`` and return the job id.

        Args:
            script: Path of the batch script.
            *args: sbatch options placed before the script (they override ``#SBATCH`` lines).
            env: Extra environment variables for sbatch; the job inherits them.
            cwd: Submit directory (default: the script's directory).

        Raises:
            SlurmError: If sbatch fails.
        """
        script = Path(script)
        proc = self.run(
            ["sbatch", "--parsable", *args, str(script)], env=env, cwd=cwd or script.parent
        )
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = proc.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch printed no job id: {proc.stdout!r} {proc.stderr!r}")
        logger.info("submitted %s as job %s", script, job_id)
        return job_id

    def qsub(
        self,
        script: Path | str,
        *args: str,
        env: Mapping[str, str] | None = None,
        cwd: Path | str | None = None,
    ) -> str:
        """Submit ``script`` through the PBS front end (``qsub ARGS SCRIPT``) and return the job id.

        ``#PBS`` directives in the script are honoured; unless the script names them, stdout and
        stderr go to ``<script name>.o<id>`` / ``.e<id>`` in the submit directory.

        Args:
            script: Path of the PBS batch script.
            *args: qsub options placed before the script.
            env: Extra environment variables for qsub; the job inherits them.
            cwd: Submit directory, i.e. ``PBS_O_WORKDIR`` (default: the script's directory).

        Raises:
            SlurmError: If qsub fails (it exits 0 on some errors, so the output is checked too).
        """
        script = Path(script)
        proc = self.run(["qsub", *args, str(script)], env=env, cwd=cwd or script.parent)
        lines = proc.stdout.strip().splitlines()
        job_id = lines[-1].strip() if lines else ""
        if not job_id.isdigit():
            raise SlurmError(f"qsub printed no job id: {proc.stdout!r} {proc.stderr!r}")
        logger.info("qsub'ed %s as job %s", script, job_id)
        return job_id

    def job_record(self, job_id: str) -> dict[str, str] | None:
        """The job's ``scontrol show job`` fields, or None once slurmctld has purged it."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        return _parse_record(proc.stdout.splitlines()[0])

    def completion_records(self, job_id: str) -> list[dict[str, str]]:
        """Every job-completion-log line of ``job_id``, oldest first (one per run of the job)."""
        if not self.jobcomp_log.exists():
            return []
        records = []
        for line in self.jobcomp_log.read_text(errors="replace").splitlines():
            if line.startswith(f"JobId={job_id} "):
                records.append(_parse_record(line))
        return records

    def state(self, job_id: str) -> str | None:
        """Current state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), None if unknown."""
        record = self.job_record(job_id)
        if record is not None:
            return record.get("JobState")
        finished = self.completion_records(job_id)
        return finished[-1].get("JobState") if finished else None

    def wait_for_state(
        self, job_id: str, states: Sequence[str], *, timeout: float, poll: float = 0.25
    ) -> str:
        """Wait until the job is in one of ``states`` and return that state.

        Args:
            job_id: The job to watch.
            states: Acceptable states, e.g. ``["RUNNING"]``.
            timeout: Seconds to wait at most; must be > 0.
            poll: Seconds between polls; must be > 0.

        Raises:
            ValueError: If ``timeout`` or ``poll`` is not positive.
            SlurmError: If the job does not get there in time (the message holds its last state).
        """
        if timeout <= 0 or poll <= 0:
            raise ValueError(f"timeout and poll must be > 0 seconds, got {timeout}, {poll}")
        deadline = time.monotonic() + timeout
        current = None
        while time.monotonic() < deadline:
            current = self.state(job_id)
            if current in states:
                return current
            time.sleep(poll)
        raise SlurmError(
            f"job {job_id} not in {list(states)} after {timeout:.0f} s (last: {current})"
        )

    def wait_for(self, job_id: str, *, timeout: float, poll: float = 0.25) -> JobResult:
        """Wait until the job has finished for good (requeues included) and return its result.

        A requeued job passes through ``PENDING`` again, so only :data:`TERMINAL_STATES` count
        as finished. On timeout the job is cancelled so it cannot disturb later tests.

        Args:
            job_id: The job to wait for.
            timeout: Seconds to wait at most; must be > 0.
            poll: Seconds between polls; must be > 0.

        Raises:
            ValueError: If ``timeout`` or ``poll`` is not positive.
            SlurmError: If the job is not finished after ``timeout`` seconds.
        """
        if timeout <= 0 or poll <= 0:
            raise ValueError(f"timeout and poll must be > 0 seconds, got {timeout}, {poll}")
        deadline = time.monotonic() + timeout
        last_state = None
        while time.monotonic() < deadline:
            record = self.job_record(job_id)
            if record is None:
                # Purged from slurmctld (older than MinJobAge): the completion log has the end.
                finished = self.completion_records(job_id)
                if finished and finished[-1].get("JobState") in TERMINAL_STATES:
                    return self._result(job_id, finished[-1], stdout_path=None, restarts=None)
            else:
                last_state = record.get("JobState")
                if last_state in TERMINAL_STATES:
                    stdout = record.get("StdOut")
                    return self._result(
                        job_id,
                        record,
                        stdout_path=Path(stdout) if stdout else None,
                        restarts=int(record.get("Restarts", "0") or 0),
                    )
            time.sleep(poll)
        self.cancel(job_id)
        raise SlurmError(
            f"job {job_id} not finished after {timeout:.0f} s (last state {last_state});"
            " cancelled it"
        )

    def _result(
        self,
        job_id: str,
        record: dict[str, str],
        *,
        stdout_path: Path | None,
        restarts: int | None,
    ) -> JobResult:
        exit_code, sig = _split_exit_code(record.get("ExitCode", ""))
        if restarts is None:
            # Each requeue left one non-terminal line in the completion log.
            restarts = sum(
                1
                for rec in self.completion_records(job_id)
                if rec.get("JobState") not in TERMINAL_STATES
            )
        return JobResult(
            job_id=str(job_id),
            state=record.get("JobState", "UNKNOWN"),
            exit_code=exit_code,
            signal=sig,
            restarts=restarts,
            stdout_path=stdout_path,
            record=record,
        )

    def cancel(self, job_id: str) -> None:
        """Cancel the job (no error when it has already finished)."""
        self.run(["scancel", "--full", str(job_id)], check=False)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """The local SLURM cluster, started once per session and stopped at its end.

    Uses ``$MLBFGS_SLURM_DIR`` (default ``/tmp/mlbfgs-slurm``) as state dir. If a cluster is
    already running there (started by hand with ``tools/slurm_local.sh start``) it is reused
    and left running; otherwise this fixture starts it and always stops it afterwards.
    """
    reason = unavailable_reason()
    if reason is not None:
        skip_or_fail(reason)
    state_dir = DEFAULT_STATE_DIR
    already_up = run_slurm_local("status", state_dir=state_dir).returncode == 0
    started_here = False
    try:
        if not already_up:
            started_here = True
            t0 = time.monotonic()
            proc = run_slurm_local("start", state_dir=state_dir)
            if proc.returncode != 0:
                pytest.fail(
                    f"tools/slurm_local.sh start failed ({proc.returncode}):\n"
                    f"{proc.stdout}\n{proc.stderr}",
                    pytrace=False,
                )
            logger.info("SLURM test cluster up in %.2f s (%s)", time.monotonic() - t0, state_dir)
        yield SlurmCluster(state_dir=state_dir)
    finally:
        if started_here:
            proc = run_slurm_local("stop", state_dir=state_dir)
            if proc.returncode != 0:
                logger.error("slurm_local.sh stop failed: %s %s", proc.stdout, proc.stderr)
