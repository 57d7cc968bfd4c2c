"""The strong-Wolfe line search, on scalars only: no tensors, no ranks.

Along a descent direction d from the point θ, the search looks at the one-dimensional function
φ(t) = f(θ + t·d) and its slope φ'(t) = ∇f(θ + t·d)ᵀd. The caller evaluates both (one closure
call: a forward and a backward pass) and hands them back as a :class:`LinePoint`. In a
distributed run the caller reduces them over the ranks first, so every rank sees the same two
floats and this module takes the same decisions, and asks for the same number of evaluations,
on every rank: nothing here can make one rank branch alone.

A step length t is accepted when it satisfies the strong Wolfe conditions (Nocedal and Wright,
*Numerical Optimization*, 2nd ed., §3.1):

    sufficient decrease   φ(t) ≤ φ(0) + c1·t·φ'(0)
    curvature             |φ'(t)| ≤ c2·|φ'(0)|

The search has two phases (ibid., Algorithms 3.5 and 3.6), with ``torch.optim.LBFGS``'s rules
for what happens when no step satisfies them::

    bracketing:  t₁ = t_init, then longer trial steps (cubic extrapolation, at most 10×)
                 until a trial fails sufficient decrease, stops decreasing (from the third
                 trial on), or slopes upward: a bracket [a, b] that contains acceptable steps
    zoom:        cubic interpolation inside the bracket, kept away from its ends, each trial
                 replacing one end, until a trial satisfies both conditions

``low`` is the end of the bracket with the lower loss, whether or not it satisfies sufficient
decrease (torch's rule: near the precision floor of float32, where the predicted decrease is
below the loss's rounding noise, a lower loss is still progress). When the search runs out of
evaluations, or the bracket shrinks below ``tolerance_change`` along d, it returns ``low``:
possibly the starting point itself (t = 0, no progress). Every choice (which trial, which end
it replaces, which end is ``low`` on a tie) is torch's, so on the same φ both searches try the
same steps and return the same one (``tests/test_linesearch.py`` checks it on noisy φ too).
The one deliberate difference: a trial whose loss or slope is not finite always replaces the
``high`` end (torch's comparisons are false on NaN and would keep it).

The caller keeps the gradient of every evaluation it may be handed back: :class:`SearchOutcome`
says whether the accepted point is the last evaluated one, the one last passed to ``keep``, or
the start.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

#: ``line_search_fn`` values :class:`~mlbfgs_hpc.MLBFGS` accepts (as ``torch.optim.LBFGS``).
LINE_SEARCH_FNS: tuple[str, ...] = ("strong_wolfe",)


@dataclass(frozen=True)
class WolfeSettings:
    """Constants of the search (``torch.optim.LBFGS``'s values by default).

    Args:
        c1: sufficient-decrease constant, in (0, c2).
        c2: curvature constant, in (c1, 1).
        tolerance_change: stop zooming once the interval, times ``max|d|``, is below this.
    """

    c1: float = 1e-4
    c2: float = 0.9
    tolerance_change: float = 1e-9

    def __post_init__(self) -> None:
        if not 0.0 < self.c1 < self.c2 < 1.0:
            raise ValueError(f"need 0 < c1 < c2 < 1, got c1={self.c1}, c2={self.c2}")
        if not (math.isfinite(self.tolerance_change) and self.tolerance_change >= 0.0):
            raise ValueError(f"tolerance_change must be a finite number >= 0, got "
                             f"{self.tolerance_change!r}")


@dataclass(frozen=True)
class LinePoint:
    """φ and φ' at step length ``t``."""

    t: float
    loss: float
    slope: float

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.slope)


@dataclass(frozen=True)
class SearchOutcome:
    """The accepted point and how the caller finds its gradient.

    Attributes:
        point: the accepted step length and φ, φ' there.
        evaluations: closure evaluations this search spent.
        source: ``"last"``: the last evaluated point (its gradient is the latest one);
            ``"kept"``: the point of the last ``keep()`` call; ``"start"``: t = 0, no
            acceptable step was found.
        satisfied: whether the strong Wolfe conditions hold at ``point``.
    """

    point: LinePoint
    evaluations: int
    source: Literal["last", "kept", "start"]
    satisfied: bool


def cubic_minimizer(a: LinePoint, b: LinePoint, lower: float, upper: float) -> float:
    """The minimiser, clamped to ``[lower, upper]``, of the cubic through φ and φ' at ``a`` and
    ``b`` (Nocedal and Wright, eq. 3.59, written from the point with the larger t, as torch
    does, so both round alike); the middle of the bounds when the cubic has no minimiser or
    an input is not finite."""
    middle = 0.5 * (lower + upper)
    values = (a.t, a.loss, a.slope, b.t, b.loss, b.slope)
    if not all(math.isfinite(v) for v in values) or a.t == b.t:
        return middle
    d1 = a.slope + b.slope - 3.0 * (a.loss - b.loss) / (a.t - b.t)
    discriminant = d1 * d1 - a.slope * b.slope
    if discriminant < 0.0:
        return middle
    d2 = math.sqrt(discriminant)
    near, far = (a, b) if a.t <= b.t else (b, a)
    denominator = far.slope - near.slope + 2.0 * d2
    if denominator == 0.0:
        return middle
    t = far.t - (far.t - near.t) * ((far.slope + d2 - d1) / denominator)
    if not math.isfinite(t):
        return middle
    return min(max(t, lower), upper)


def strong_wolfe_search(evaluate: Callable[[float], LinePoint], *, start: LinePoint,
                        t_init: float, direction_max: float, settings: WolfeSettings,
                        max_evals: int, keep: Callable[[], None]) -> SearchOutcome:
    """Search a step length along a descent direction (see the module docstring).

    Args:
        evaluate: φ and φ' at a step length (one closure evaluation); its values must be the
            same on every rank.
        start: φ(0) and φ'(0) (< 0: a descent direction).
        t_init: the first trial step (> 0).
        direction_max: ``max|d|``, to measure the interval in parameter space.
        settings: the constants.
        max_evals: evaluations this search may spend (>= 1; the first trial always runs).
            ``torch.optim.LBFGS`` gives each search what is left of the step's ``max_eval``,
            and so does :mod:`mlbfgs_hpc.searched`.
        keep: called right after the evaluation of a point that becomes the best acceptable
            point so far; the caller keeps that evaluation's gradient (a copy).

    Raises:
        ValueError: ``start.slope`` is not negative, ``t_init`` not positive, or
            ``max_evals`` < 1.
    """
    if not (math.isfinite(start.slope) and start.slope < 0.0):
        raise ValueError(f"the direction must descend: φ'(0) = {start.slope!r}")
    if not (math.isfinite(t_init) and t_init > 0.0):
        raise ValueError(f"t_init must be a finite number > 0, got {t_init!r}")
    if max_evals < 1:
        raise ValueError(f"max_evals must be >= 1, got {max_evals!r}")
    s = settings
    decrease_limit = s.c1 * start.slope       # φ(t) ≤ φ(0) + t·c1·φ'(0)
    flat_enough = -s.c2 * start.slope         # |φ'(t)| ≤ c2·|φ'(0)|

    def decreases(p: LinePoint) -> bool:
        return p.finite and p.loss <= start.loss + p.t * decrease_limit

    def flat(p: LinePoint) -> bool:
        return abs(p.slope) <= flat_enough

    evaluations = 0
    last: LinePoint | None = None

    def trial(t: float) -> LinePoint:
        nonlocal evaluations, last
        evaluations += 1
        last = evaluate(t)
        return last

    def outcome(point: LinePoint, satisfied: bool) -> SearchOutcome:
        source: Literal["last", "kept", "start"] = (
            "start" if point is start else "last" if point is last else "kept")
        return SearchOutcome(point=point, evaluations=evaluations, source=source,
                             satisfied=satisfied)

    def low_first(bracket: list[LinePoint]) -> tuple[int, int]:
        """(low, high) positions: the lower loss is ``low``; a tie, or a non-finite second
        end, keeps position 0 low (torch's rule, made NaN-safe)."""
        first, second = bracket
        return (0, 1) if (first.loss <= second.loss or not second.finite) else (1, 0)

    # ---- bracketing: longer steps until a bracket holds acceptable points -------------
    previous, current = start, trial(t_init)
    bracket: list[LinePoint] | None = None
    while evaluations < max_evals:
        if not decreases(current) or (evaluations > 2 and current.loss >= previous.loss):
            bracket = [previous, current]
            break
        if flat(current):
            return outcome(current, True)
        if current.slope >= 0.0:          # past a minimum: it lies between the two points
            bracket = [previous, current]
            break
        keep()                            # a candidate for the bracket's low end
        # Extrapolate: at least 1 % further than the last extension, at most 10× the step.
        lower = current.t + 0.01 * (current.t - previous.t)
        t = cubic_minimizer(previous, current, lower, 10.0 * current.t)
        previous, current = current, trial(t)
    if bracket is None:                   # out of evaluations while extending
        bracket = [start, current]
        low, _ = low_first(bracket)
        return outcome(bracket[low], False)

    # ---- zoom: shrink the bracket until a trial satisfies both conditions --------------
    low, high = low_first(bracket)
    if bracket[low] is current:
        keep()
    near_end_before = False
    while evaluations < max_evals:
        left, right = sorted((bracket[0].t, bracket[1].t))
        width = right - left
        if width * direction_max < s.tolerance_change:
            break
        t = cubic_minimizer(bracket[0], bracket[1], left, right)
        # Keep trials at least 10 % of the bracket from its ends: a cubic that keeps
        # landing next to one end shrinks the bracket by almost nothing per evaluation.
        margin = 0.1 * width
        if min(right - t, t - left) < margin:
            if near_end_before or t >= right or t <= left:
                t = right - margin if abs(t - right) < abs(t - left) else left + margin
                near_end_before = False
            else:
                near_end_before = True
        else:
            near_end_before = False
        current = trial(t)
        if not decreases(current) or current.loss >= bracket[low].loss:
            bracket[high] = current
            low, high = low_first(bracket)
            if bracket[low] is current:   # lower, though not by enough: still the best
                keep()
            continue
        if flat(current):
            return outcome(current, True)
        if current.slope * (bracket[high].t - bracket[low].t) >= 0.0:
            bracket[high] = bracket[low]
        keep()
        bracket[low] = current
    return outcome(bracket[low], False)
