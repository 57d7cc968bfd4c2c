"""The common interface of a PINN problem, the autograd derivatives it needs, and the loss
and error a trainer computes from it.

A problem knows its domain box, how to draw collocation points, its PDE residual, its
boundary / initial / periodic residual and a float64 reference solution. The loss a trainer
builds from the two residuals is::

    loss = mean(pde_residual**2) + constraint_weight * mean(constraint_residual**2)

with the means taken over the *whole* point sets (see :func:`pinn_loss` for sharded sums).
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .points import CollocationPoints

logger = logging.getLogger(__name__)

# One rule for every task, fixed before any training run and never tuned: the weight of the
# issue's Poisson setting. A trainer may pass another `constraint_weight` to any problem.
DEFAULT_CONSTRAINT_WEIGHT = 100.0


@dataclass(frozen=True)
class PinnDefaults:
    """Proposed default sizes of a task: collocation points and the tanh MLP.

    Args:
        n_interior: PDE residual points.
        n_constraint: boundary / initial (and periodic-pair) points.
        width: neurons per hidden layer.
        depth: hidden layers.
    """

    n_interior: int
    n_constraint: int
    width: int
    depth: int


class PINNProblem(abc.ABC):
    """A PDE on a box with its constraints and reference solution.

    Subclasses set the class attributes ``name``, ``input_dim`` and ``defaults``, the domain
    box ``lower`` / ``upper`` (one bound per coordinate; time, where there is one, is the last
    coordinate), and implement :meth:`pde_residual`, :meth:`_sample_constraint`,
    :meth:`reference` and, where there is an analytic solution, :meth:`exact`.

    Args:
        constraint_weight: weight of the mean squared constraint residual in the loss (> 0).
    """

    name: ClassVar[str]
    input_dim: ClassVar[int]
    defaults: ClassVar[PinnDefaults]
    lower: tuple[float, ...]
    upper: tuple[float, ...]

    def __init__(self, *, constraint_weight: float = DEFAULT_CONSTRAINT_WEIGHT) -> None:
        if not math.isfinite(constraint_weight) or constraint_weight <= 0:
            raise ValueError(f"constraint_weight must be finite and > 0, got {constraint_weight!r}")
        self.constraint_weight = float(constraint_weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(constraint_weight={self.constraint_weight})"

    # -- points ------------------------------------------------------------------------
    def sample(self, *, n_interior: int, n_constraint: int, generator: torch.Generator,
               dtype: torch.dtype = torch.float32) -> CollocationPoints:
        """Collocation points drawn from ``generator`` (a CPU generator; same state, same points).

        Interior points are uniform (i.i.d.) in the box; then ``n_constraint`` constraint
        residual points are spread over the boundary / initial pieces in the problem's fixed
        proportion (a periodic pair counts as one point). All coordinates are drawn in float64
        and then cast, so a float32 and a float64 sample from one seed are the same points.

        Args:
            n_interior: number of interior points (>= 1).
            n_constraint: number of constraint residuals (>= 1).
            generator: the random stream; advanced by the draw.
            dtype: floating dtype of the returned tensors.
        """
        for label, count in (("n_interior", n_interior), ("n_constraint", n_constraint)):
            if not isinstance(count, int) or count < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {count!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        interior = uniform_in_box(n_interior, self.lower, self.upper, generator)
        constraint, target, periodic_lower, periodic_upper = self._sample_constraint(
            n_constraint, generator)
        return CollocationPoints(interior=interior, constraint=constraint,
                                 constraint_target=target, periodic_lower=periodic_lower,
                                 periodic_upper=periodic_upper).to(dtype)

    @abc.abstractmethod
    def _sample_constraint(self, n: int, generator: torch.Generator) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """float64 ``(constraint, target, periodic_lower, periodic_upper)`` with
        ``len(constraint) + len(periodic_lower) == n``; ``None`` for no periodic pairs."""

    # -- residuals ---------------------------------------------------------------------
    @abc.abstractmethod
    def pde_residual(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``(N,)`` PDE residual of ``model`` at ``x`` ``(N, d)``, differentiable with respect
        to the model's parameters (also when called under ``torch.no_grad``)."""

    def constraint_residual(self, model: nn.Module, points: CollocationPoints) -> torch.Tensor:
        """``(Nc + Np,)``: ``u(constraint) - constraint_target``, then
        ``u(periodic_lower) - u(periodic_upper)`` for the periodic pairs (if any)."""
        residual = evaluate(model, points.constraint) - points.constraint_target
        if points.periodic_lower.shape[0] == 0:
            return residual
        pairs = evaluate(model, torch.cat([points.periodic_lower, points.periodic_upper]))
        lower, upper = pairs.chunk(2)
        return torch.cat([residual, lower - upper])

    # -- solutions ---------------------------------------------------------------------
    def exact(self, x: torch.Tensor) -> torch.Tensor | None:
        """``(N,)`` analytic solution at ``x``, in ``x``'s dtype; ``None`` where there is none."""
        return None

    @abc.abstractmethod
    def reference(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 evaluation points ``(M, d)`` and reference values ``(M,)`` (fresh copies of
        a table computed once per process)."""


# -- derivatives -----------------------------------------------------------------------
def evaluate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` as a ``(N,)`` tensor (the model may return ``(N,)`` or ``(N, 1)``)."""
    u = model(x)
    if u.shape not in ((x.shape[0],), (x.shape[0], 1)):
        raise ValueError(f"model must return (N,) or (N, 1) for N = {x.shape[0]} points, "
                         f"got shape {tuple(u.shape)}")
    return u.reshape(x.shape[0])


def with_input_grad(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a fresh leaf that requires grad (the caller's tensor is left untouched)."""
    return x.detach().requires_grad_(True)


def gradient(u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``(N, d)`` derivatives ``du_n/dx_n`` of pointwise outputs ``u`` ``(N,)``, kept in the
    graph so the result can be differentiated again (second derivatives, the loss)."""
    (grad,) = torch.autograd.grad(u, x, grad_outputs=torch.ones_like(u), create_graph=True)
    return grad


def second_derivative(du: torch.Tensor, x: torch.Tensor, coordinate: int) -> torch.Tensor:
    """``(N,)`` pure second derivative along ``coordinate``, from the first derivatives
    ``du`` ``(N, d)`` that :func:`gradient` returned."""
    return gradient(du[:, coordinate], x)[:, coordinate]


# -- what a trainer computes -------------------------------------------------------------
def pinn_residuals(problem: PINNProblem, model: nn.Module,
                   points: CollocationPoints) -> tuple[torch.Tensor, torch.Tensor]:
    """The PDE residuals at ``points.interior`` and the constraint residuals of ``points``."""
    return problem.pde_residual(model, points.interior), problem.constraint_residual(model, points)


def pinn_loss(pde_res: torch.Tensor, constraint_res: torch.Tensor, *, weight: float,
              n_pde_total: int | None = None, n_constraint_total: int | None = None
              ) -> torch.Tensor:
    """``sum(pde_res**2) / n_pde_total + weight * sum(constraint_res**2) / n_constraint_total``.

    With the default totals (the residuals' own lengths) this is the mean-squared PINN loss.
    On a rank holding a shard, pass the whole sets' totals: the ranks' values then sum to
    the loss of the whole set (an average over ranks needs a factor ``world_size``).

    Args:
        pde_res: PDE residuals (this rank's).
        constraint_res: constraint residuals (this rank's).
        weight: the constraint weight (>= 0).
        n_pde_total: number of PDE residuals over all ranks (default ``pde_res.numel()``).
        n_constraint_total: number of constraint residuals over all ranks
            (default ``constraint_res.numel()``).
    """
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be finite and >= 0, got {weight!r}")
    pde_term = _sum_of_squares_over(pde_res, n_pde_total, "n_pde_total")
    constraint_term = _sum_of_squares_over(constraint_res, n_constraint_total,
                                           "n_constraint_total")
    return pde_term + weight * constraint_term


def _sum_of_squares_over(residual: torch.Tensor, total: int | None, label: str) -> torch.Tensor:
    count = residual.numel()
    total = count if total is None else total
    if not isinstance(total, int) or total < count:
        raise ValueError(f"{label} must be an integer >= the {count} local residuals, "
                         f"got {total!r}")
    # An empty shard contributes an exact zero that still depends on the parameters' graph.
    return residual.square().sum() / max(total, 1)


@torch.no_grad()
def relative_l2(model: nn.Module, problem: PINNProblem, *, batch: int = 65536) -> float:
    """``||u_model - u_ref|| / ||u_ref||`` over ``problem.reference()``.

    The model runs in its own dtype and device, ``batch`` points at a time; the sums are
    accumulated in float64.
    """
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    points, reference = problem.reference()
    dtype, device = _model_dtype_device(model)
    error_sq = torch.zeros((), dtype=torch.float64)
    for start in range(0, points.shape[0], batch):
        x = points[start:start + batch].to(device=device, dtype=dtype)
        u = evaluate(model, x).to(device="cpu", dtype=torch.float64)
        error_sq += (u - reference[start:start + batch]).square().sum()
    return math.sqrt(float(error_sq) / float(reference.square().sum()))


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The dtype and device of the model's first floating parameter or buffer; float64 on the
    CPU for a model without any (an analytic solution wrapped as a module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype, tensor.device
    return torch.float64, torch.device("cpu")


# -- sampling helpers --------------------------------------------------------------------
def split_count(n: int, shares: Sequence[int]) -> list[int]:
    """``n`` split in proportion to the integer ``shares``; the remainder goes to the first
    pieces, one each (a fixed, seed-independent split)."""
    total = sum(shares)
    counts = [n * share // total for share in shares]
    for i in range(n - sum(counts)):
        counts[i % len(counts)] += 1
    return counts


def uniform_in_box(n: int, lower: Sequence[float], upper: Sequence[float],
                   generator: torch.Generator) -> torch.Tensor:
    """``(n, d)`` float64 points uniform in the box ``[lower, upper]``."""
    low = torch.tensor(lower, dtype=torch.float64)
    high = torch.tensor(upper, dtype=torch.float64)
    return low + (high - low) * torch.rand(n, len(lower), generator=generator,
                                           dtype=torch.float64)


def uniform_on_face(n: int, lower: Sequence[float], upper: Sequence[float], *, coordinate: int,
                    value: float, generator: torch.Generator) -> torch.Tensor:
    """``(n, d)`` float64 points uniform on the face ``x[coordinate] == value`` of the box."""
    points = uniform_in_box(n, lower, upper, generator)
    points[:, coordinate] = value
    return points


def box_faces(n: int, lower: Sequence[float], upper: Sequence[float],
              generator: torch.Generator) -> torch.Tensor:
    """``(n, d)`` float64 points on the whole boundary of the box, the same number (up to one)
    on each face, faces in the order lower / upper of coordinate 0, then of coordinate 1..."""
    faces = [(coordinate, bound) for coordinate in range(len(lower))
             for bound in (lower[coordinate], upper[coordinate])]
    counts = split_count(n, [1] * len(faces))
    return torch.cat([uniform_on_face(count, lower, upper, coordinate=coordinate, value=value,
                                      generator=generator)
                      for count, (coordinate, value) in zip(counts, faces)])


def grid(*axes: torch.Tensor) -> torch.Tensor:
    """``(prod(len(axis)), d)`` points of the tensor grid of ``axes`` (first axis fastest)."""
    mesh = torch.meshgrid(*reversed(axes), indexing="ij")
    return torch.stack([m.reshape(-1) for m in reversed(mesh)], dim=1)
