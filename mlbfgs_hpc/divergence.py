"""A stop for diverged runs: :class:`TrainingDivergedError` and the rule that raises it.

A step whose averaged gradient has a non-finite entry is skipped on every rank (the decision
comes from the step's first allgather), as ``torch.amp.GradScaler`` skips an overflowed one.
A scaler then lowers its scale and the next step is usually finite; a run whose gradients
stay non-finite step after step, or whose parameters are non-finite, has diverged and
nothing it does afterwards is training. So:

* a non-finite parameter (one that takes part in the step) raises at once;
* ``max_consecutive_skips`` skipped steps in a row raise (``None``: never);
* skip warnings are logged at the 1st, 2nd, 4th, 8th, ... skipped step of the run (every
  one at DEBUG), so a long streak cannot flood the log.

Every rank raises at the same step with the same message (the names come from an
``allgather_object`` that only this rare path takes). :class:`DivergenceReport` is what
``mlbfgs-train`` makes of it: one line and the last good checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger("mlbfgs_hpc.optimizer")

#: The default of ``MLBFGS(max_consecutive_skips=...)``. GradScaler's dynamic loss scaling
#: skips a handful of steps in a row while it finds its scale (each skip halves it); 20 in a
#: row is far beyond that and, without a scaler, means every batch overflows.
DEFAULT_MAX_CONSECUTIVE_SKIPS = 20

DivergenceReason = Literal["non-finite parameters", "non-finite gradients"]


class TrainingDivergedError(RuntimeError):
    """Raised by :meth:`MLBFGS.step <mlbfgs_hpc.MLBFGS.step>` when the run has diverged.

    Attributes:
        reason: ``"non-finite parameters"`` or ``"non-finite gradients"``.
        names: the parameters concerned (non-finite values, or non-finite gradient entries
            at the last skipped step), in layout order.
        step: the optimizer's step counter (steps taken, skipped ones excluded).
        calls: how many ``step()`` calls saw the problem, the failing one included (the
            skipped streak, or 1): the parameters as they were when the first of them began
            are the last suspect ones.
    """

    def __init__(self, message: str, *, reason: DivergenceReason, names: Sequence[str],
                 step: int, calls: int) -> None:
        super().__init__(message)
        self.reason: DivergenceReason = reason
        self.names = tuple(names)
        self.step = step
        self.calls = calls


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    more = len(names) - limit
    return shown + (f" and {more} more" if more > 0 else "")


class SkipGuard:
    """Counts skipped steps in a row, rate-limits their warnings and stops a diverged run.

    Args:
        max_consecutive_skips: raise at this many skipped steps in a row; ``None``: never.

    Raises:
        ValueError: ``max_consecutive_skips`` is not ``None`` or an integer >= 1.
    """

    def __init__(self, *, max_consecutive_skips: int | None) -> None:
        if max_consecutive_skips is not None and (
                not isinstance(max_consecutive_skips, int)
                or isinstance(max_consecutive_skips, bool) or max_consecutive_skips < 1):
            raise ValueError("max_consecutive_skips must be None or an integer >= 1, got "
                             f"{max_consecutive_skips!r}")
        self.max_consecutive_skips = max_consecutive_skips
        #: Skipped steps since the last step taken (not checkpointed: restarts on resume).
        self.streak = 0

    def stepped(self) -> None:
        """A step was taken: the streak ends."""
        self.streak = 0

    def skipped(self, *, total: int, step: int, names: Sequence[str]) -> None:
        """A step was skipped (``total``: skipped steps of the run, this one included;
        ``step``: the step counter; ``names``: parameters with a non-finite gradient entry).

        Raises:
            TrainingDivergedError: the streak reached ``max_consecutive_skips``.
        """
        self.streak += 1
        where = _listed(names) if names else "the gradient"
        if self.max_consecutive_skips is not None and self.streak >= self.max_consecutive_skips:
            raise TrainingDivergedError(
                f"training diverged: the gradient was non-finite at {self.streak} steps in a "
                f"row (max_consecutive_skips={self.max_consecutive_skips}; {step} steps "
                f"taken before them); last: {where}", reason="non-finite gradients",
                names=names, step=step, calls=self.streak)
        if total & (total - 1) == 0:   # 1, 2, 4, 8, ...
            logger.warning("non-finite gradient (%s): step skipped (%d so far, %d in a row; "
                           "this warning is repeated at the %d%s skipped step)", where, total,
                           self.streak, 2 * total, _ordinal_suffix(2 * total))
        else:
            logger.debug("non-finite gradient (%s): step skipped (%d so far)", where, total)


def non_finite_parameters_error(names: Sequence[str], *, step: int) -> TrainingDivergedError:
    """The error for parameters that hold NaN or ±Inf at the start of a step."""
    return TrainingDivergedError(
        f"training diverged: parameter{'s' if len(names) > 1 else ''} {_listed(names)} "
        f"{'are' if len(names) > 1 else 'is'} non-finite (NaN or Inf) after {step} steps",
        reason="non-finite parameters", names=names, step=step, calls=1)


def _ordinal_suffix(n: int) -> str:
    if n % 100 in (11, 12, 13):
        return "th"
    return {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")


@dataclass(frozen=True)
class DivergenceReport:
    """A diverged run, for a person: what happened and where to resume from.

    Attributes:
        error: the optimizer's error.
        failed_step: the training step (1-based) whose ``step()`` raised.
        last_good: ``(step, path)`` of the newest checkpoint written before the trouble
            began, or ``None``.
        run_dir: the run directory.
    """

    error: TrainingDivergedError
    failed_step: int
    last_good: tuple[int, Path] | None
    run_dir: Path

    @classmethod
    def of(cls, error: TrainingDivergedError, *, failed_step: int, run_dir: Path,
           checkpoints: Sequence[tuple[int, Path]]) -> DivergenceReport:
        """``checkpoints``: ``(step, path)`` of the valid checkpoints, oldest first.

        ``error.calls`` steps saw the problem, ending at ``failed_step``: the parameters at
        the start of the first of them (written by a checkpoint of step ``failed_step -
        calls``) are suspect, so a good checkpoint is one of an earlier step."""
        bound = failed_step - error.calls - 1
        good = [(step, path) for step, path in checkpoints if step <= bound]
        return cls(error=error, failed_step=failed_step, last_good=good[-1] if good else None,
                   run_dir=Path(run_dir))

    def message(self) -> str:
        """One line: the error, and the checkpoint to resume from (or that none is kept)."""
        if self.last_good is None:
            bound = self.failed_step - self.error.calls - 1
            advice = (f"no checkpoint of step {bound} or earlier is kept in {self.run_dir}: "
                      "start again, e.g. with a smaller --lr")
        else:
            step, path = self.last_good
            advice = (f"last good checkpoint: {path} (step {step}); resume from it with "
                      f"--resume {path}, e.g. with a smaller --lr")
        return f"step {self.failed_step}: {self.error}; {advice}"

    def record(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` record of the event."""
        return {"event": "diverged", "step": self.failed_step, "reason": self.error.reason,
                "parameters": list(self.error.names),
                "last_good_checkpoint": None if self.last_good is None else str(
                    self.last_good[1])}
