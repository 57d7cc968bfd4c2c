"""The step's first allgather: is it safe to step, how long is the gradient, who takes part.

One row per rank, one collective, every rank decoding the same matrix the same way::

    rank r:  [grad non-finite_r, (‖g_r‖² when clipping), params non-finite_r, *idle words_r]
                │ allgather
                ▼
    Σ in rank order of the first columns   -> skip / raise / clip factor (identical everywhere)
    AND of the idle words over the ranks   -> the parameters idle this step
                                              (:mod:`mlbfgs_hpc.participation`)

The gradient and parameter columns are each rank's *owned* slice (the others' are checked by
their owners); the idle words cover every parameter (each rank sees every ``.grad``).
:class:`StepGate` is the optimizer's use of it: skip, stop a diverged run
(:mod:`mlbfgs_hpc.divergence`), clip, and say who takes part.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from typing import Any

import numpy as np
import torch

from .divergence import SkipGuard, non_finite_parameters_error
from .flatops import clip_factor, gradient_row
from .participation import ParticipationTracker, StepParticipation, pack_bits
from .stepsize import sum_in_rank_order


def check_row(*, grad: torch.Tensor, params: torch.Tensor, idle_words: list[float],
              measure_norm: bool) -> list[float]:
    """This rank's row (see the module docstring)."""
    return [*gradient_row(grad, measure_norm=measure_norm, params=params), *idle_words]


@dataclass(frozen=True)
class StepCheck:
    """The decoded allgather.

    Attributes:
        gradient_finite: no rank saw a non-finite gradient entry.
        parameters_finite: no rank saw a non-finite parameter entry (idle ones included).
        grad_sq: ‖g‖² over every rank's slice (NaN unless measured).
        idle_words: ranks × words of the idle flags, to AND.
    """

    gradient_finite: bool
    parameters_finite: bool
    grad_sq: float
    idle_words: np.ndarray

    @classmethod
    def from_rank_rows(cls, rows: np.ndarray, *, measure_norm: bool) -> StepCheck:
        head = 2 if measure_norm else 1
        totals = sum_in_rank_order(rows[:, :head + 1])
        return cls(gradient_finite=totals[0] == 0, parameters_finite=totals[head] == 0,
                   grad_sq=totals[1] if measure_norm else math.nan,
                   idle_words=rows[:, head + 1:])


class StepGate:
    """Whether and how a step goes ahead, from ONE allgather (see the module docstring).

    Args:
        comm: the communicator.
        participation: the optimizer's :class:`~mlbfgs_hpc.participation.ParticipationTracker`.
        max_grad_norm: clip the gradient to this global norm (``None``: off).
        max_consecutive_skips: see :class:`~mlbfgs_hpc.divergence.SkipGuard`.
    """

    def __init__(self, *, comm: Any, participation: ParticipationTracker,
                 max_grad_norm: float | None, max_consecutive_skips: int | None) -> None:
        self.comm, self.participation, self.max_grad_norm = comm, participation, max_grad_norm
        self.skips = SkipGuard(max_consecutive_skips=max_consecutive_skips)
        #: Global norm of the gradient before clipping at the last step that went ahead.
        self.grad_norm = math.nan

    def check(self, *, grad: torch.Tensor, params: torch.Tensor, steps_taken: int,
              skipped_before: int) -> StepParticipation | None:
        """Who takes part in the step, or ``None`` when some rank's gradient is not finite
        (skip it everywhere). ``grad``/``params``: the owned flat buffers (``grad`` is
        clipped in place, a frozen parameter's stale gradient zeroed); ``steps_taken`` and
        ``skipped_before``: the optimizer's counters.

        Raises:
            TrainingDivergedError: a parameter taking part is not finite, or the skip was
                one too many in a row.
        """
        tracker, measure = self.participation, self.max_grad_norm is not None
        idle_words = pack_bits(tracker.local_idle())
        for span in tracker.frozen_owned():
            grad[span.start:span.stop].zero_()
        row = check_row(grad=grad, params=params, idle_words=idle_words, measure_norm=measure)
        check = StepCheck.from_rank_rows(self.comm.allgather_scalars(row), measure_norm=measure)
        taking_part = tracker.decide(check.idle_words, first_step=steps_taken == 0)
        if not check.parameters_finite:
            names = self.non_finite_names(params, taking_part)
            if names:   # (an idle parameter may hold what it likes)
                raise non_finite_parameters_error(names, step=steps_taken)
        if not check.gradient_finite:
            self.skips.skipped(total=skipped_before + 1, step=steps_taken,
                               names=self.non_finite_names(grad, taking_part))
            return None
        self.skips.stepped()
        if self.max_grad_norm is not None:
            self.grad_norm = math.sqrt(check.grad_sq)
            factor = clip_factor(check.grad_sq, self.max_grad_norm)
            if factor < 1.0:
                grad.mul_(factor)
        return taking_part

    def non_finite_names(self, flat: torch.Tensor, taking_part: StepParticipation
                         ) -> list[str]:
        """Names of the parameters taking part whose entries of ``flat`` (an owned flat
        buffer) are not all finite, from every rank in layout order (a collective)."""
        tracker = self.participation
        first = tracker.first_param
        local = [tracker.names[first + j] for j, span in enumerate(tracker.spans)
                 if first + j not in taking_part.idle
                 and not bool(torch.isfinite(flat[span.start:span.stop]).all())]
        return [name for names in self.comm.allgather_object(local) for name in names]
