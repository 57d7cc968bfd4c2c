"""Graceful stop on scheduler signals: checkpoint at the next step boundary, then exit.

SLURM (``--signal=USR1@N``) and PBS (SIGTERM before the walltime kill) warn a job shortly
before its time runs out. The handlers here only set a flag; the training loop folds the flag
into the per-step collective, so *every* rank learns at the same step that some rank was
signalled, all of them write the checkpoint together and exit with :data:`EXIT_REQUEUE`.
A second SIGTERM means "now": the process exits at once with 128 + SIGTERM.

Exit codes of ``mlbfgs-train``:

=====  =================================================================================
0      training finished (or the run directory already held a finished run)
2      bad command-line arguments
3      the run diverged (a non-finite parameter, or too many non-finite gradients in a
       row): stopped without a checkpoint; the one-line message names the last good one
99     stopped by SIGUSR1/SIGTERM after writing a checkpoint; rerun to resume
       (the batch scripts in ``jobs/`` requeue the job on this code)
143    a second SIGTERM arrived: exited immediately without a checkpoint
=====  =================================================================================
"""

from __future__ import annotations

import logging
import os
import signal
import time
from types import FrameType

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_DIVERGED = 3
EXIT_REQUEUE = 99
EXIT_IMMEDIATE = 128 + signal.SIGTERM


class StopRequest:
    """Records SIGUSR1/SIGTERM; a second SIGTERM exits the process immediately.

    Args:
        signals: the signals that request a checkpoint-and-exit.
    """

    def __init__(self, *, signals: tuple[signal.Signals, ...] = (signal.SIGUSR1,
                                                                   signal.SIGTERM)) -> None:
        self.received: signal.Signals | None = None
        self._terms = 0
        self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        sig = signal.Signals(signum)
        if sig == signal.SIGTERM:
            self._terms += 1
            if self._terms > 1:
                os.write(2, f"{_stamp()} second SIGTERM: exiting now without "
                            f"checkpoint\n".encode())
                os._exit(EXIT_IMMEDIATE)
        if self.received is None:
            self.received = sig
            # A raw write, not logging (its lock may be held by the interrupted code); the loop
            # logs properly at the step boundary. The time stamp dates the scheduler's warning.
            os.write(2, f"{_stamp()} received {sig.name}: will checkpoint and exit at the "
                        f"next step boundary\n".encode())

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _stamp() -> str:
    """``[mlbfgs-hpc HH:MM:SS.mmm pid N]``: when and where a signal arrived."""
    now = time.time()
    return (f"[mlbfgs-hpc {time.strftime('%H:%M:%S', time.localtime(now))}."
            f"{int(now % 1 * 1000):03d} pid {os.getpid()}]")


def process_age_seconds() -> float:
    """Seconds since this process started (Linux ``/proc``), or 0.0 where that is unknown.

    ``--stop-after`` counts from here rather than from the end of the start-up, because the
    batch scripts derive it from the job's walltime: imports, MPI start-up and data loading
    happen inside the walltime too.
    """
    try:
        with open("/proc/self/stat", "rb") as fh:
            # Field 22 (starttime, clock ticks after boot); the command name (field 2) may
            # hold spaces, so count from the ')' that closes it: field 3 is index 0 there.
            fields = fh.read().rsplit(b")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0
