"""The strong-Wolfe line search on scalars (``mlbfgs_hpc.linesearch``).

Oracles: the conditions themselves, the exact minimiser of a cubic, and torch's own
strong-Wolfe search (``torch.optim.lbfgs._strong_wolfe``) on the same functions and
directions: the search is the one ``torch.optim.LBFGS`` users rely on, so where both follow
the same rules they must accept the same step after the same number of evaluations.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
import torch
from torch.optim.lbfgs import _strong_wolfe

from mlbfgs_hpc.linesearch import (LinePoint, SearchOutcome, WolfeSettings,
                                   cubic_minimizer, strong_wolfe_search)

Objective = Callable[[torch.Tensor], torch.Tensor]


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    return (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2).sum()


def quadratic(x: torch.Tensor) -> torch.Tensor:
    scales = torch.logspace(0, 3, x.numel(), dtype=x.dtype)
    return 0.5 * (scales * x * x).sum()


def value_and_grad(f: Objective, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    value = f(x)
    (grad,) = torch.autograd.grad(value, x)
    return float(value.detach()), grad


def search_both(f: Objective, x: torch.Tensor, t_init: float
                ) -> tuple[tuple[float, int, float], tuple[float, int, float]]:
    """(t, evaluations, φ(t)) of this package's search and of torch's, along d = −∇f(x)."""
    f0, g0 = value_and_grad(f, x)
    d = -g0
    slope0 = float(g0 @ d)

    def evaluate(t: float) -> LinePoint:
        value, grad = value_and_grad(f, x + t * d)
        return LinePoint(t, value, float(grad @ d))

    kept: list[int] = []
    ours = strong_wolfe_search(evaluate, start=LinePoint(0.0, f0, slope0), t_init=t_init,
                               direction_max=float(d.abs().max()), settings=WolfeSettings(),
                               max_evals=26,
                               keep=lambda: kept.append(1))

    def obj_func(x0: torch.Tensor, t: float, direction: torch.Tensor
                 ) -> tuple[float, torch.Tensor]:
        return value_and_grad(f, x0 + t * direction)

    f_t, _, t_t, evals_t = _strong_wolfe(obj_func, x, t_init, d, f0, g0, slope0)
    return (ours.point.t, ours.evaluations, ours.point.loss), (float(t_t), evals_t, float(f_t))


def test_cubic_minimizer_is_exact_on_a_cubic_and_falls_back_to_bisection() -> None:
    def cubic(t: float) -> tuple[float, float]:   # minimum at t = 2 on (0, 4)
        return t ** 3 / 3 - t * t + 1.0, t * t - 2 * t   # f' = t² − 2t: min at 2

    a = LinePoint(0.5, *cubic(0.5))
    b = LinePoint(3.0, *cubic(3.0))
    assert cubic_minimizer(a, b, 0.0, 4.0) == pytest.approx(2.0, rel=1e-12)
    assert cubic_minimizer(b, a, 0.0, 4.0) == pytest.approx(2.0, rel=1e-12)
    assert cubic_minimizer(a, b, 0.0, 1.5) == 1.5                        # clamped
    inf = LinePoint(1.0, math.inf, 0.0)
    assert cubic_minimizer(a, inf, 0.0, 1.0) == 0.5                      # not finite: bisect
    assert cubic_minimizer(a, a, 0.0, 2.0) == 1.0                        # one point: bisect


@pytest.mark.parametrize(("name", "f", "x", "t_init"), [
    ("rosenbrock, unit start", rosenbrock, torch.tensor([-1.2, 1.0, 0.3], dtype=torch.float64),
     1.0),
    # (evaluations measured: 7, 4, 5, 2, 3: zoom, extrapolation and both)
    ("rosenbrock, short start", rosenbrock, torch.tensor([0.5, 0.2, -0.4, 0.9],
                                                         dtype=torch.float64), 1e-6),
    ("rosenbrock, long start", rosenbrock, torch.tensor([0.5, 0.2, -0.4, 0.9],
                                                        dtype=torch.float64), 3.0),
    ("quadratic, overshoot", quadratic, torch.linspace(-1, 1, 6, dtype=torch.float64), 1.0),
    ("quadratic, short start", quadratic, torch.linspace(-1, 1, 6, dtype=torch.float64), 1e-5),
])
def test_accepts_a_strong_wolfe_step_as_torch_does(name: str, f: Objective, x: torch.Tensor,
                                                    t_init: float) -> None:
    (t, evals, value), (t_torch, evals_torch, value_torch) = search_both(f, x, t_init)
    assert evals == evals_torch, name
    assert t == pytest.approx(t_torch, rel=1e-10), name
    assert value == pytest.approx(value_torch, rel=1e-10), name
    # And the conditions themselves hold at the accepted step.
    f0, g0 = value_and_grad(f, x)
    d = -g0
    value_t, grad_t = value_and_grad(f, x + t * d)
    assert value_t <= f0 + 1e-4 * t * float(g0 @ d)
    assert abs(float(grad_t @ d)) <= 0.9 * abs(float(g0 @ d))


def test_a_trial_with_a_non_finite_loss_shrinks_the_step() -> None:
    # φ(t) = (t − 1)², but every t > 3 overflows: the first trial (t = 10) must not stop the
    # search, it becomes the upper end of the interval.
    def evaluate(t: float) -> LinePoint:
        if t > 3.0:
            return LinePoint(t, math.inf, math.nan)
        return LinePoint(t, (t - 1.0) ** 2, 2.0 * (t - 1.0))

    outcome = strong_wolfe_search(evaluate, start=LinePoint(0.0, 1.0, -2.0), t_init=10.0,
                                  direction_max=1.0, settings=WolfeSettings(), max_evals=25,
                                  keep=lambda: None)
    assert outcome.satisfied and outcome.source == "last"
    assert 0.0 < outcome.point.t <= 3.0
    assert abs(outcome.point.slope) <= 0.9 * 2.0


def torch_search_1d(phi: Callable[[float], LinePoint], t_init: float, max_evals: int,
                    start: LinePoint | None = None) -> tuple[float, int]:
    """(t, evaluations) of torch's search on a scalar φ (a one-element parameter, d = 1),
    given the same evaluation budget (torch's ``max_ls`` counts the trials after the first);
    ``start``: φ and φ' at 0 (default ``phi(0)``)."""
    start = start or phi(0.0)

    def obj_func(x: torch.Tensor, t: float, d: torch.Tensor) -> tuple[float, torch.Tensor]:
        point = phi(float(x) + float(t))
        return point.loss, torch.tensor([point.slope], dtype=torch.float64)

    _, _, t, evals = _strong_wolfe(obj_func, torch.zeros(1, dtype=torch.float64), t_init,
                                   torch.ones(1, dtype=torch.float64), start.loss,
                                   torch.tensor([start.slope], dtype=torch.float64),
                                   start.slope, max_ls=max_evals - 1)
    return float(t), evals


def ours_1d(phi: Callable[[float], LinePoint], t_init: float, max_evals: int,
            keep: Callable[[], None] = lambda: None, start: LinePoint | None = None
            ) -> SearchOutcome:
    return strong_wolfe_search(phi, start=start or phi(0.0), t_init=t_init,
                               direction_max=1.0,
                               settings=WolfeSettings(), max_evals=max_evals, keep=keep)


def test_out_of_evaluations_returns_the_last_point_or_the_start() -> None:
    # A function that only decreases a little and always slopes down: the curvature condition
    # never holds, so the search extrapolates until it runs out of evaluations.
    def phi(t: float) -> LinePoint:
        return LinePoint(t, -1e-3 * t, -1.0)

    points: list[float] = []

    def tracked(t: float) -> LinePoint:
        points.append(t)
        return phi(t)

    outcome = ours_1d(tracked, 1.0, 4)
    assert outcome.evaluations == 4 and not outcome.satisfied
    assert outcome.source == "last" and outcome.point.t == points[-1]
    assert (outcome.point.t, outcome.evaluations) == torch_search_1d(phi, 1.0, 4)

    # Nothing lower at all (every trial increases φ): back to the start, as torch.
    def rising(t: float) -> LinePoint:
        return LinePoint(t, 1.0 + t, 1.0)

    start = LinePoint(0.0, 1.0, -1.0)
    outcome = ours_1d(rising, 1.0, 5, keep=lambda: pytest.fail("nothing is lower"),
                      start=start)
    assert outcome.source == "start" and outcome.point.t == 0.0 and not outcome.satisfied
    assert outcome.evaluations == 5
    assert torch_search_1d(rising, 1.0, 5, start=start) == (0.0, 5)


def test_a_lower_loss_without_sufficient_decrease_is_still_taken_as_torch_does() -> None:
    # The float32 floor in one dimension: the slopes say φ descends at 0 and rises beyond,
    # but the values differ from φ(0) by rounding-sized amounts (1e-14·t·e^(−t), far below
    # the 1e-4·t·|φ'(0)| sufficient decrease asks for). No trial satisfies sufficient
    # decrease, yet all are lower than φ(0): torch's search returns the lowest end of its
    # bracket, and so must ours (returning the start, t = 0, leaves L-BFGS where it was).
    def phi(t: float) -> LinePoint:
        return LinePoint(t, 1.0 - 1e-14 * t * math.exp(-t), -1e-6 if t == 0.0 else 1e-6)

    kept: list[float] = []
    last: list[float] = []

    def tracked(t: float) -> LinePoint:
        last.append(t)
        return phi(t)

    outcome = ours_1d(tracked, 1.0, 26, keep=lambda: kept.append(last[-1]))
    assert not outcome.satisfied
    assert outcome.point.t > 0.0 and outcome.point.loss < phi(0.0).loss
    assert outcome.point.loss > phi(0.0).loss + 1e-4 * outcome.point.t * -1e-6  # not enough
    assert (outcome.point.t, outcome.evaluations) == torch_search_1d(phi, 1.0, 26)
    if outcome.source == "kept":
        assert kept[-1] == outcome.point.t
    else:
        assert outcome.source == "last" and last[-1] == outcome.point.t


def noisy_phi(case: int) -> tuple[Callable[[float], LinePoint], float]:
    """A 1-D function whose values carry noise its slopes do not (as float32 losses near
    their precision floor), and a first trial step."""
    r = random.Random(case)
    a, c = r.uniform(0.05, 3.0), r.uniform(0.5, 2.0)
    noise = r.choice([0.0, 1e-3, 1e-2, 0.1, 1.0])
    kind = r.choice(["quadratic", "quartic", "tanh"])
    scale = {"quadratic": 2 * c * a, "quartic": 4 * a ** 3 + c, "tanh": c}[kind]

    def phi(t: float) -> LinePoint:
        if kind == "quadratic":
            value, slope = c * (t - a) ** 2, 2 * c * (t - a)
        elif kind == "quartic":
            value, slope = (t - a) ** 4 - c * t, 4 * (t - a) ** 3 - c
        else:
            value, slope = -c * math.tanh(t), -c / math.cosh(t) ** 2
        return LinePoint(t, value + noise * scale * math.sin(100.0 * (case + 1) * t), slope)

    return phi, r.choice([1.0, 1e-3, 5.0, 0.3])


def test_noisy_functions_get_torchs_steps() -> None:
    # 400 noisy φ (smooth, flat and rough): the same step after the same evaluations as
    # torch's search. (Measured before torch's low-end rule was adopted: 118 of 2,000 such
    # cases differed.)
    for case in range(400):
        phi, t_init = noisy_phi(case)
        ours = ours_1d(phi, t_init, 26)
        t_torch, evals_torch = torch_search_1d(phi, t_init, 26)
        assert ours.evaluations == evals_torch, case
        assert ours.point.t == pytest.approx(t_torch, rel=1e-9, abs=1e-15), case


def test_zoom_hands_back_a_kept_point_when_the_last_trial_is_worse() -> None:
    # A narrow dip: φ(t) = −exp(−((t − 0.3)/0.05)²). The first trial (t = 1) is flat and no
    # lower than φ(0) ≈ 0; zoom then finds points around the dip. With few evaluations, the
    # search ends on its best point, which need not be the last one tried.
    def phi(t: float) -> LinePoint:
        z = (t - 0.3) / 0.05
        value = -math.exp(-z * z)
        return LinePoint(t, value, value * -2.0 * z / 0.05)

    kept: list[LinePoint] = []
    last: list[LinePoint] = []

    def evaluate(t: float) -> LinePoint:
        last.append(phi(t))
        return last[-1]

    outcome = ours_1d(evaluate, 1.0, 3, keep=lambda: kept.append(last[-1]))
    assert not outcome.satisfied
    assert outcome.source in ("kept", "last")
    if outcome.source == "kept":
        assert outcome.point is kept[-1] and outcome.point is not last[-1]
    else:
        assert outcome.point is last[-1]
    assert outcome.point.loss == min(p.loss for p in [phi(0.0), *last])
    assert (outcome.point.t, outcome.evaluations) == torch_search_1d(phi, 1.0, 3)


def test_refuses_an_ascent_direction_and_bad_settings() -> None:
    with pytest.raises(ValueError, match="descend"):
        strong_wolfe_search(lambda t: LinePoint(t, 0.0, 0.0), start=LinePoint(0.0, 0.0, 1.0),
                            t_init=1.0, direction_max=1.0, settings=WolfeSettings(),
                            max_evals=25, keep=lambda: None)
    with pytest.raises(ValueError, match="t_init"):
        strong_wolfe_search(lambda t: LinePoint(t, 0.0, 0.0), start=LinePoint(0.0, 0.0, -1.0),
                            t_init=0.0, direction_max=1.0, settings=WolfeSettings(),
                            max_evals=25, keep=lambda: None)
    with pytest.raises(ValueError, match="max_evals"):
        strong_wolfe_search(lambda t: LinePoint(t, 0.0, 0.0), start=LinePoint(0.0, 0.0, -1.0),
                            t_init=1.0, direction_max=1.0, settings=WolfeSettings(),
                            max_evals=0, keep=lambda: None)
    with pytest.raises(ValueError, match="c1 < c2"):
        WolfeSettings(c1=0.9, c2=0.1)
