"""The PINN tasks: 2-D Poisson, 1-D viscous Burgers, 1-D convection, 2-D Helmholtz.

Coordinates are ``(x, y)`` for the steady problems and ``(x, t)`` for the time-dependent ones.
Every task uses the same constraint weight (:data:`DEFAULT_CONSTRAINT_WEIGHT`) unless a
caller passes another. ``defaults`` are the proposed sizes (see each class).
"""

from __future__ import annotations

import abc
import functools
import math

import torch
from torch import nn

from .cole_hopf import burgers_reference_table
from .problem import (
    PINNProblem, PinnDefaults, box_faces, evaluate, gradient, grid, second_derivative,
    split_count, uniform_on_face, with_input_grad,
)

_PI = math.pi
# float64 (constraint points, targets, periodic lower points, periodic upper points).
_ConstraintDraw = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@functools.lru_cache(maxsize=8)
def _grid_points(lower: tuple[float, ...], upper: tuple[float, ...],
                 counts: tuple[int, ...]) -> torch.Tensor:
    """float64 tensor grid over the box, ``counts[i]`` points along coordinate ``i`` (cached)."""
    axes = [torch.linspace(low, high, count, dtype=torch.float64)
            for low, high, count in zip(lower, upper, counts)]
    return grid(*axes)


class _AnalyticProblem(PINNProblem):
    """A problem with an analytic solution; its reference is that solution on a grid."""

    reference_counts: tuple[int, ...]

    @abc.abstractmethod
    def exact(self, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` analytic solution at ``x``, in ``x``'s dtype."""

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        points = _grid_points(tuple(self.lower), tuple(self.upper), self.reference_counts)
        return points.clone(), self.exact(points)


class Poisson(_AnalyticProblem):
    """``-Δu = 2π² sin(πx) sin(πy)`` on the unit square, ``u = 0`` on its boundary;
    ``u = sin(πx) sin(πy)``.

    Defaults: the issue's setting, 2,000 interior + 400 boundary points (100 per edge), tanh
    3 × 40. Reference: a 101 × 101 grid with the boundary.
    """

    name = "poisson"
    input_dim = 2
    defaults = PinnDefaults(n_interior=2000, n_constraint=400, width=40, depth=3)
    lower = (0.0, 0.0)
    upper = (1.0, 1.0)
    reference_counts = (101, 101)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(_PI * x[:, 0]) * torch.sin(_PI * x[:, 1])

    def pde_residual(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = with_input_grad(x)
            du = gradient(evaluate(model, x), x)
            laplacian = second_derivative(du, x, 0) + second_derivative(du, x, 1)
            return -laplacian - 2.0 * _PI ** 2 * self.exact(x.detach())

    def _sample_constraint(self, n: int, generator: torch.Generator) -> _ConstraintDraw:
        points = box_faces(n, self.lower, self.upper, generator)
        return points, torch.zeros(n, dtype=torch.float64), None, None


class Helmholtz(_AnalyticProblem):
    """``Δu + k²u = q`` on ``[-1, 1]²`` with ``u = sin(a1 π x) sin(a2 π y)``, ``a1 = 1``,
    ``a2 = 4``, ``k = 1`` (Wang, Teng & Perdikaris 2021), ``q = (k² - (a1² + a2²) π²) u``;
    Dirichlet data from ``u`` on the boundary. The held-out task: never tuned on.

    Defaults: 4,000 interior + 800 boundary points, tanh 4 × 50 (four periods in ``y`` need
    more points and width than Poisson's single bump). Reference: a 201 × 201 grid.
    """

    name = "helmholtz"
    input_dim = 2
    defaults = PinnDefaults(n_interior=4000, n_constraint=800, width=50, depth=4)
    lower = (-1.0, -1.0)
    upper = (1.0, 1.0)
    reference_counts = (201, 201)

    def __init__(self, *, a1: float = 1.0, a2: float = 4.0, k: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.a1, self.a2, self.k = float(a1), float(a2), float(k)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.a1 * _PI * x[:, 0]) * torch.sin(self.a2 * _PI * x[:, 1])

    def source(self, x: torch.Tensor) -> torch.Tensor:
        """The right-hand side ``q`` at ``x``."""
        return (self.k ** 2 - (self.a1 ** 2 + self.a2 ** 2) * _PI ** 2) * self.exact(x)

    def pde_residual(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = with_input_grad(x)
            u = evaluate(model, x)
            du = gradient(u, x)
            laplacian = second_derivative(du, x, 0) + second_derivative(du, x, 1)
            return laplacian + self.k ** 2 * u - self.source(x.detach())

    def _sample_constraint(self, n: int, generator: torch.Generator) -> _ConstraintDraw:
        points = box_faces(n, self.lower, self.upper, generator)
        return points, self.exact(points), None, None


class Convection(_AnalyticProblem):
    """``u_t + β u_x = 0``, ``x ∈ [0, 2π]``, ``t ∈ [0, 1]``, ``β = 30``, ``u(x, 0) = sin x``,
    periodic in ``x``: ``u(0, t) = u(2π, t)``; ``u = sin(x - βt)``. A known failure case of
    plain PINNs (Krishnapriyan et al. 2021, "Characterizing possible failure modes").

    Constraint residuals: half initial points, half periodic pairs ``(0, t)`` / ``(2π, t)``.
    Defaults: 1,000 interior + 200 constraint points, tanh 4 × 50 (Krishnapriyan et al.'s
    network). Reference: 256 (x) × 100 (t) grid with both ends.
    """

    name = "convection"
    input_dim = 2
    defaults = PinnDefaults(n_interior=1000, n_constraint=200, width=50, depth=4)
    lower = (0.0, 0.0)
    upper = (2.0 * _PI, 1.0)
    reference_counts = (256, 100)

    def __init__(self, *, beta: float = 30.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.beta = float(beta)

    def exact(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x[:, 0] - self.beta * x[:, 1])

    def pde_residual(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = with_input_grad(x)
            du = gradient(evaluate(model, x), x)
            return du[:, 1] + self.beta * du[:, 0]

    def _sample_constraint(self, n: int, generator: torch.Generator) -> _ConstraintDraw:
        n_initial, n_periodic = split_count(n, (1, 1))
        initial = uniform_on_face(n_initial, self.lower, self.upper, coordinate=1,
                                  value=self.lower[1], generator=generator)
        lower = uniform_on_face(n_periodic, self.lower, self.upper, coordinate=0,
                                value=self.lower[0], generator=generator)
        upper = lower.clone()
        upper[:, 0] = self.upper[0]
        return initial, torch.sin(initial[:, 0]), lower, upper


class Burgers(PINNProblem):
    """``u_t + u u_x - ν u_xx = 0``, ``x ∈ [-1, 1]``, ``t ∈ [0, 1]``, ``ν = 0.01/π``,
    ``u(x, 0) = -sin(πx)``, ``u(±1, t) = 0`` (Raissi et al. 2019).

    Constraint points: half on ``t = 0``, a quarter on each of ``x = ±1``. Reference: the
    Cole–Hopf solution (:mod:`.cole_hopf`) on Raissi et al.'s grid, 256 ``x`` × 100 ``t``
    (``t = 0, 0.01, ..., 0.99``). Defaults: Raissi et al.'s 10,000 interior points and tanh
    8 × 20, with 300 constraint points.
    """

    name = "burgers"
    input_dim = 2
    defaults = PinnDefaults(n_interior=10000, n_constraint=300, width=20, depth=8)
    lower = (-1.0, 0.0)
    upper = (1.0, 1.0)

    def __init__(self, *, nu: float = 0.01 / _PI, **kwargs) -> None:
        super().__init__(**kwargs)
        if not nu > 0:
            raise ValueError(f"nu must be > 0, got {nu!r}")
        self.nu = float(nu)

    def pde_residual(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = with_input_grad(x)
            u = evaluate(model, x)
            du = gradient(u, x)
            return du[:, 1] + u * du[:, 0] - self.nu * second_derivative(du, x, 0)

    def _sample_constraint(self, n: int, generator: torch.Generator) -> _ConstraintDraw:
        n_initial, n_left, n_right = split_count(n, (2, 1, 1))
        initial = uniform_on_face(n_initial, self.lower, self.upper, coordinate=1,
                                  value=self.lower[1], generator=generator)
        left = uniform_on_face(n_left, self.lower, self.upper, coordinate=0,
                               value=self.lower[0], generator=generator)
        right = uniform_on_face(n_right, self.lower, self.upper, coordinate=0,
                                value=self.upper[0], generator=generator)
        target = torch.cat([-torch.sin(_PI * initial[:, 0]),
                            torch.zeros(n_left + n_right, dtype=torch.float64)])
        return torch.cat([initial, left, right]), target, None, None

    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        points, values = burgers_reference_table(self.nu)
        return points.clone(), values.clone()


PROBLEMS: dict[str, type[PINNProblem]] = {
    problem.name: problem for problem in (Poisson, Burgers, Convection, Helmholtz)
}
