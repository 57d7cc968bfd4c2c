"""One writer per run directory: a lock that the operating system drops when its holder dies.

``mlbfgs-train`` holds :class:`RunDirLock` on ``RUN_DIR/run.lock`` for the whole run
(:func:`hold_run_dir`: rank 0 takes it and tells the other ranks; code that drives
:class:`~mlbfgs_hpc.train.Trainer` itself can do the same). A second run on the same
directory (a double submission, a requeued job whose old instance is still alive, a typo)
exits at once with exit code 2 and a message naming the host, process and job that hold it,
instead of interleaving its lines into ``metrics.jsonl`` and overwriting the other run's
checkpoints.

The lock file must not be opened by anything else in the holding process: closing any
descriptor of a file drops the process's POSIX locks on it.

The lock is a POSIX record lock (``fcntl``/``lockf``) on an open file. The kernel (or the file
server) releases it when the process exits, however it exits (SIGKILL, out of memory, node
reboot), so a killed job never leaves a stale lock behind, and nothing needs cleaning up; the
file itself stays (its content, ``host pid job started``, only names the holder while the
lock is held). A SLURM requeue resumes normally: the old instance is gone, and so is its
lock. Should the old instance of the *same* SLURM job still be shutting down when its
requeued instance starts, the new one waits up to :data:`SAME_JOB_WAIT_S` for it.

Which file systems honour it across nodes (POSIX locks are the kind cluster file systems
implement; Linux's ``flock()`` on NFS is itself emulated with them):

* NFSv4: yes (locks are part of the protocol; a crashed client's locks go when its lease
  expires, typically 90 s). NFSv3: yes through ``lockd``/``statd`` (NLM), unless the client
  mounts with ``nolock`` or ``local_lock=all``/``posix``: then locks are node-local.
* Lustre: with the client mount option ``flock`` (cluster-wide); ``localflock`` makes them
  node-local, ``noflock`` makes the call fail.
* IBM Storage Scale (GPFS), CephFS: yes. BeeGFS: only with ``tuneUseGlobalFileLocks=true``
  (its default keeps locks node-local).
* Node-local disks (``/tmp``, local scratch): yes on that node, which is all a run there can
  reach.

Where the file system refuses locks (the call fails with ENOLCK, ENOSYS, EOPNOTSUPP or
EINVAL), the run goes on with a warning saying that a second run would not be stopped. Where
locks are silently node-local (Lustre ``localflock``, NFS ``nolock``, BeeGFS by default), a
second run on *another* node is not detected: use a run directory per job there.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .comm import LocalCommunicator

logger = logging.getLogger(__name__)

__all__ = ["RunDirLock", "RunDirBusyError", "hold_run_dir", "LOCK_NAME", "SAME_JOB_WAIT_S"]

LOCK_NAME = "run.lock"
#: How long a requeued SLURM job waits for its own earlier instance to release the lock.
SAME_JOB_WAIT_S = 60.0
_POLL_S = 0.5
_UNSUPPORTED = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


class RunDirBusyError(RuntimeError):
    """Another process holds the run directory's lock; the message names it."""


@dataclass(frozen=True, kw_only=True)
class Holder:
    """Who holds a run directory's lock, as it wrote itself into the lock file."""

    host: str
    pid: int
    job: str
    started: str

    def describe(self) -> str:
        job = "" if self.job == "-" else f", SLURM job {self.job}"
        return f"process {self.pid} on host {self.host}{job}, running since {self.started}"


def _job_id() -> str:
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or "-"


class RunDirLock:
    """An exclusive, process-lifetime lock on a run directory.

    Args:
        run_dir: the run directory (created if missing).
        same_job_wait_s: how long to wait when the holder is an earlier instance of this
            same batch job (``SLURM_JOB_ID``/``PBS_JOBID``), e.g. after a requeue.
    """

    def __init__(self, *, run_dir: str | Path, same_job_wait_s: float = SAME_JOB_WAIT_S) -> None:
        if not same_job_wait_s >= 0:
            raise ValueError(f"same_job_wait_s must be >= 0, got {same_job_wait_s!r}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.same_job_wait_s = same_job_wait_s
        self._fd: int | None = None
        self.supported = True

    def acquire(self) -> RunDirLock:
        """Take the lock, or raise at once (after the same-job grace wait, if any).

        Raises:
            RunDirBusyError: another live process holds it; the message names host, pid, job.
            OSError: the lock file cannot be created.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline: float | None = None
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno in _UNSUPPORTED:
                    os.close(fd)
                    self.supported = False
                    logger.warning("the file system of %s refuses file locks (%s): this run "
                                   "goes on, but a second run on the same directory would "
                                   "not be stopped", self.run_dir, os.strerror(exc.errno))
                    return self
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise
            holder = self.holder()
            same_job = holder is not None and holder.job == _job_id() != "-"
            if same_job and deadline is None:
                deadline = time.monotonic() + self.same_job_wait_s
                logger.warning("run directory %s is still held by an earlier instance of this "
                               "job (%s); waiting up to %.0f s for it to end", self.run_dir,
                               holder.describe(), self.same_job_wait_s)
            if deadline is None or time.monotonic() >= deadline:
                os.close(fd)
                who = holder.describe() if holder else "another process (it has not yet " \
                    "written its name)"
                raise RunDirBusyError(
                    f"run directory {self.run_dir} is in use by {who}: one run per directory "
                    f"(wait for it to end, or pass another --run-dir)")
            time.sleep(_POLL_S)
        self._fd = fd
        record = (f"{socket.gethostname()} {os.getpid()} {_job_id()} "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        os.fsync(fd)
        return self

    def holder(self) -> Holder | None:
        """Who holds (or last held) the lock, from the lock file; ``None`` if unreadable."""
        try:
            fields = self.path.read_text(encoding="utf-8").split()
        except OSError:
            return None
        if len(fields) != 4 or not fields[1].isdigit():
            return None
        return Holder(host=fields[0], pid=int(fields[1]), job=fields[2], started=fields[3])

    def release(self) -> None:
        """Drop the lock (closing the file drops it; exiting the process does too)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextlib.contextmanager
def hold_run_dir(run_dir: str | Path, comm: LocalCommunicator) -> Iterator[RunDirLock | None]:
    """Hold ``run_dir``'s lock for the ``with`` block (collective: every rank enters it).

    Rank 0 takes the lock and tells the others whether it got it, so every rank raises the
    same :class:`RunDirBusyError` (and no rank starts training) when another run holds it.
    Yields the lock on rank 0, ``None`` on the other ranks.
    """
    lock: RunDirLock | None = None
    refusal: str | None = None
    if comm.rank == 0:
        try:
            lock = RunDirLock(run_dir=run_dir).acquire()
        except (RunDirBusyError, OSError) as exc:
            refusal = str(exc) if isinstance(exc, RunDirBusyError) else \
                f"cannot create the lock file in run directory {run_dir}: {exc}"
    refusal = comm.broadcast_object(refusal)
    if refusal is not None:
        raise RunDirBusyError(refusal)
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
