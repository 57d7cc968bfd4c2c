"""Physics-informed neural network (PINN) problems: PDEs, collocation points, the network.

Pure PyTorch, no communication and no I/O: a trainer draws :class:`CollocationPoints` from a
problem, takes its rank's ``shard``, and minimises :func:`pinn_loss` of
:func:`pinn_residuals`; :func:`relative_l2` measures the error against the reference::

    problem = PROBLEMS["poisson"]()
    points = problem.sample(n_interior=2000, n_constraint=400,
                            generator=torch.Generator().manual_seed(0))
    model = PinnMLP(input_dim=problem.input_dim, lower=problem.lower, upper=problem.upper)
    pde, constraint = pinn_residuals(problem, model, points)
    loss = pinn_loss(pde, constraint, weight=problem.constraint_weight)
"""

from __future__ import annotations

from .model import PinnMLP
from .points import CollocationPoints
from .problem import (
    DEFAULT_CONSTRAINT_WEIGHT, PINNProblem, PinnDefaults, pinn_loss, pinn_residuals, relative_l2,
)
from .problems import PROBLEMS, Burgers, Convection, Helmholtz, Poisson

__all__ = [
    "PROBLEMS", "PINNProblem", "CollocationPoints", "PinnMLP", "pinn_residuals", "pinn_loss",
    "relative_l2", "PinnDefaults", "DEFAULT_CONSTRAINT_WEIGHT", "Poisson", "Burgers",
    "Convection", "Helmholtz",
]
