"""The PINN problem library: residuals vanish on the exact solutions, points are drawn and
split deterministically, the network and the error metric behave, and the Burgers reference
(Cole–Hopf quadrature) matches the equation and Basdevant et al.'s benchmark."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mlbfgs_hpc.pinn import (
    PROBLEMS, Burgers, CollocationPoints, Convection, PinnMLP, PINNProblem, Poisson,
    pinn_loss, pinn_residuals, relative_l2,
)
from mlbfgs_hpc.pinn.cole_hopf import burgers_reference_table, cole_hopf_burgers

ANALYTIC = ("poisson", "convection", "helmholtz")
NU = 0.01 / math.pi


class ExactModel(nn.Module):
    """The problem's analytic solution as a model (no parameters)."""

    def __init__(self, problem: PINNProblem) -> None:
        super().__init__()
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.exact(x).unsqueeze(1)


class ColeHopfModel(nn.Module):
    """The Burgers reference formula as a model, differentiable through the quadrature."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cole_hopf_burgers(x[:, 0], x[:, 1], nu=NU)


class PerturbedModel(nn.Module):
    """The exact solution plus 0.1 (x0 + x1)²: wrong in the interior and on the boundary."""

    def __init__(self, problem: PINNProblem) -> None:
        super().__init__()
        self.problem = problem

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.problem.exact(x) + 0.1 * (x[:, 0] + x[:, 1]).square()


def largest(values: torch.Tensor) -> float:
    return float(values.detach().abs().max())


class ScaledModel(nn.Module):
    def __init__(self, inner: nn.Module, scale: float) -> None:
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.inner(x)


def sample(problem: PINNProblem, *, seed: int = 0, n_interior: int = 50, n_constraint: int = 23,
           dtype: torch.dtype = torch.float64) -> CollocationPoints:
    return problem.sample(n_interior=n_interior, n_constraint=n_constraint,
                          generator=torch.Generator().manual_seed(seed), dtype=dtype)


def in_box(problem: PINNProblem, x: torch.Tensor) -> bool:
    lower = torch.tensor(problem.lower, dtype=x.dtype)
    upper = torch.tensor(problem.upper, dtype=x.dtype)
    return bool(((x >= lower) & (x <= upper)).all())


def on_boundary(problem: PINNProblem, x: torch.Tensor) -> torch.Tensor:
    """Per point: does some coordinate sit exactly on a face of the box?"""
    lower = torch.tensor(problem.lower, dtype=x.dtype)
    upper = torch.tensor(problem.upper, dtype=x.dtype)
    return ((x == lower) | (x == upper)).any(dim=1)


# -- residuals of exact solutions --------------------------------------------------------
@pytest.mark.parametrize("name", ANALYTIC)
def test_residuals_vanish_on_exact_solution(name):
    problem = PROBLEMS[name]()
    points = sample(problem, n_interior=500, n_constraint=200)
    pde, constraint = pinn_residuals(problem, ExactModel(problem), points)
    assert pde.shape == (500,) and constraint.shape == (points.n_constraint_residuals,)
    assert pde.dtype == torch.float64
    assert largest(pde) < 1e-10
    assert largest(constraint) < 1e-10


@pytest.mark.parametrize("name", ANALYTIC)
def test_residuals_detect_a_wrong_solution(name):
    problem = PROBLEMS[name]()
    points = sample(problem, n_interior=200, n_constraint=100)
    pde, constraint = pinn_residuals(problem, PerturbedModel(problem), points)
    assert largest(pde) > 1e-2 and largest(constraint) > 1e-2


def test_burgers_residuals_vanish_on_cole_hopf_solution():
    """The problem's autograd residual (u_t + u u_x - ν u_xx) of the quadrature formula, on
    points over the whole domain, the shock included (t > 0: ∂/∂t of sqrt(t) is singular at 0)."""
    problem = Burgers()
    points = sample(problem, n_interior=150, n_constraint=60)
    interior = points.interior.clone()
    interior[:, 1] = 0.01 + 0.99 * interior[:, 1]
    interior[:3] = torch.tensor([[0.0, 0.5], [0.003, 0.8], [-0.002, 0.99]], dtype=torch.float64)
    pde = problem.pde_residual(ColeHopfModel(), interior)
    assert largest(pde) < 1e-10
    constraint = problem.constraint_residual(ColeHopfModel(), points)
    assert largest(constraint) < 1e-12


def test_convection_periodic_residual_is_the_difference_of_partners():
    problem = Convection()
    points = sample(problem, n_interior=10, n_constraint=40)
    assert points.sizes == {"interior": 10, "constraint": 20, "periodic": 20}
    assert bool((points.periodic_lower[:, 0] == 0).all())
    assert bool((points.periodic_upper[:, 0] == problem.upper[0]).all())
    assert torch.equal(points.periodic_lower[:, 1], points.periodic_upper[:, 1])

    class FirstCoordinate(nn.Module):
        def forward(self, x):
            return x[:, 0]

    residual = problem.constraint_residual(FirstCoordinate(), points)
    torch.testing.assert_close(residual[:20], points.constraint[:, 0] - torch.sin(points.constraint[:, 0]))
    torch.testing.assert_close(residual[20:], torch.full((20,), -2 * math.pi, dtype=torch.float64))


# -- sampling ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_sampling_is_deterministic_inside_the_domain_and_on_the_boundary(name):
    problem = PROBLEMS[name]()
    first, again, other = sample(problem, seed=3), sample(problem, seed=3), sample(problem, seed=4)
    for field in ("interior", "constraint", "constraint_target", "periodic_lower",
                  "periodic_upper"):
        assert torch.equal(getattr(first, field), getattr(again, field)), field
    assert not torch.equal(first.interior, other.interior)
    assert first.sizes["interior"] == 50 and first.n_constraint_residuals == 23
    for x in (first.interior, first.constraint, first.periodic_lower, first.periodic_upper):
        assert in_box(problem, x)
    assert bool(on_boundary(problem, first.constraint).all())
    assert not bool(on_boundary(problem, first.interior).any())
    single = sample(problem, seed=3, dtype=torch.float32)
    assert single.interior.dtype == single.constraint_target.dtype == torch.float32
    torch.testing.assert_close(single.interior, first.interior.float(), rtol=0, atol=0)
    default = problem.sample(n_interior=5, n_constraint=5, generator=torch.Generator())
    assert default.interior.dtype == torch.float32


def test_constraint_points_spread_over_the_boundary_pieces():
    poisson = sample(Poisson(), n_constraint=400)
    x, y = poisson.constraint[:, 0], poisson.constraint[:, 1]
    assert [int((x == 0).sum()), int((x == 1).sum()), int((y == 0).sum()),
            int((y == 1).sum())] == [100, 100, 100, 100]
    assert float(poisson.constraint_target.abs().max()) == 0.0
    burgers = sample(Burgers(), n_constraint=300)
    x, t = burgers.constraint[:, 0], burgers.constraint[:, 1]
    initial = t == 0
    assert [int(initial.sum()), int((x == -1).sum()), int((x == 1).sum())] == [150, 75, 75]
    torch.testing.assert_close(burgers.constraint_target[initial], -torch.sin(math.pi * x[initial]))
    assert float(burgers.constraint_target[~initial].abs().max()) == 0.0


@pytest.mark.parametrize("bad", [{"n_interior": 0}, {"n_constraint": 0}, {"n_interior": 2.5},
                                 {"dtype": torch.int64}])
def test_sample_rejects_bad_arguments(bad):
    arguments = {"n_interior": 5, "n_constraint": 5, "generator": torch.Generator()} | bad
    with pytest.raises(ValueError):
        Poisson().sample(**arguments)


def test_constraint_weight_defaults_to_one_rule_and_can_be_set():
    assert {problem().constraint_weight for problem in PROBLEMS.values()} == {100.0}
    assert Poisson(constraint_weight=1.0).constraint_weight == 1.0
    with pytest.raises(ValueError):
        Poisson(constraint_weight=0.0)


# -- shard / select / to --------------------------------------------------------------------
@pytest.mark.parametrize("name", ["poisson", "convection"])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_shards_concatenate_to_the_whole_set(name, world_size):
    points = sample(PROBLEMS[name](), n_interior=50, n_constraint=23)
    shards = [points.shard(rank=rank, world_size=world_size) for rank in range(world_size)]
    for field in ("interior", "constraint", "constraint_target", "periodic_lower",
                  "periodic_upper"):
        joined = torch.cat([getattr(shard, field) for shard in shards])
        assert torch.equal(joined, getattr(points, field)), field
    sizes = [shard.sizes["interior"] for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_shard_beyond_the_points_is_empty_and_gives_a_zero_loss():
    problem = Poisson()
    points = sample(problem, n_interior=2, n_constraint=2)
    empty = points.shard(rank=3, world_size=4)
    assert empty.sizes == {"interior": 0, "constraint": 0, "periodic": 0}
    model = PinnMLP(input_dim=2, lower=problem.lower, upper=problem.upper).double()
    pde, constraint = pinn_residuals(problem, model, empty)
    loss = pinn_loss(pde, constraint, weight=100.0, n_pde_total=2, n_constraint_total=2)
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_select_picks_the_rows_of_every_point_set():
    points = sample(Convection(), n_interior=30, n_constraint=20)
    interior = torch.tensor([4, 0, 29])
    constraint = torch.tensor([9, 1])
    periodic = torch.tensor([2, 7, 3])
    chosen = points.select(interior=interior, constraint=constraint, periodic=periodic)
    assert torch.equal(chosen.interior, points.interior[interior])
    assert torch.equal(chosen.constraint, points.constraint[constraint])
    assert torch.equal(chosen.constraint_target, points.constraint_target[constraint])
    assert torch.equal(chosen.periodic_lower, points.periodic_lower[periodic])
    assert torch.equal(chosen.periodic_upper, points.periodic_upper[periodic])
    with pytest.raises(ValueError, match="periodic"):
        points.select(interior=interior, constraint=constraint)
    plain = sample(Poisson(), n_interior=30, n_constraint=20)
    mask = torch.arange(20) % 2 == 0
    assert torch.equal(plain.select(interior=interior, constraint=mask).constraint,
                       plain.constraint[mask])


def test_points_move_and_validate_shapes():
    points = sample(Poisson())
    single = points.to(torch.float32)
    assert single.constraint_target.dtype == single.periodic_upper.dtype == torch.float32
    assert single.sizes == points.sizes
    with pytest.raises(ValueError):
        CollocationPoints(interior=points.interior, constraint=points.constraint,
                          constraint_target=points.constraint_target[:-1])
    with pytest.raises(ValueError):
        CollocationPoints(interior=points.interior, constraint=points.constraint[:, :1],
                          constraint_target=points.constraint_target)


# -- network ------------------------------------------------------------------------------
def test_mlp_maps_the_box_onto_the_unit_cube_and_initialises_deterministically():
    lower, upper = (0.0, -1.0), (2 * math.pi, 3.0)
    model = PinnMLP(input_dim=2, width=20, depth=4, lower=lower, upper=upper)
    corners = torch.tensor([lower, upper, [math.pi, 1.0]])
    torch.testing.assert_close(model.normalize(corners),
                               torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]]))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(20, 2)] + [(20, 20)] * 3 + [(1, 20)]
    assert all(largest(m.bias) == 0.0 for m in linears)
    assert model.state_dict().keys() == dict(model.named_parameters()).keys()  # buffers fixed
    assert model(corners).shape == (3, 1)
    torch.manual_seed(7)
    first = PinnMLP(input_dim=2, lower=lower, upper=upper)
    torch.manual_seed(7)
    second = PinnMLP(input_dim=2, lower=lower, upper=upper)
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    big = PinnMLP(input_dim=2, width=400, depth=2, lower=lower, upper=upper)
    std = float(big.layers[2].weight.detach().std())  # Glorot normal: sqrt(2 / (400 + 400))
    assert abs(std - math.sqrt(2 / 800)) < 0.1 * math.sqrt(2 / 800)
    double = model.double()
    assert double.input_scale.dtype == torch.float64
    with pytest.raises(ValueError):
        PinnMLP(input_dim=2, lower=(0.0, 1.0), upper=(1.0, 1.0))


def test_residual_of_the_network_backpropagates_even_under_no_grad():
    problem = PROBLEMS["burgers"]()
    torch.manual_seed(0)
    model = PinnMLP(input_dim=2, width=8, depth=2, lower=problem.lower, upper=problem.upper)
    points = sample(problem, dtype=torch.float32)
    with torch.no_grad():
        pde, constraint = pinn_residuals(problem, model, points)
    assert pde.dtype == torch.float32 and pde.requires_grad
    pinn_loss(pde, constraint, weight=problem.constraint_weight).backward()
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert not points.interior.requires_grad


# -- loss and error -----------------------------------------------------------------------
def test_pinn_loss_is_the_weighted_mean_and_shards_sum_to_it():
    pde = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.5], dtype=torch.float64)
    constraint = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    whole = pinn_loss(pde, constraint, weight=10.0)
    torch.testing.assert_close(whole, pde.square().mean() + 10.0 * constraint.square().mean())
    shards = [pinn_loss(pde[a:b], constraint[c:d], weight=10.0, n_pde_total=5,
                        n_constraint_total=3)
              for (a, b), (c, d) in (((0, 2), (0, 1)), ((2, 4), (1, 2)), ((4, 5), (2, 3)))]
    torch.testing.assert_close(sum(shards), whole)
    with pytest.raises(ValueError):
        pinn_loss(pde, constraint, weight=1.0, n_pde_total=4)
    with pytest.raises(ValueError):
        pinn_loss(pde, constraint, weight=-1.0)


@pytest.mark.parametrize("name", ANALYTIC)
def test_relative_l2_is_zero_for_the_exact_and_one_for_the_zero_model(name):
    problem = PROBLEMS[name]()
    assert relative_l2(ExactModel(problem), problem) < 1e-14
    zero = ScaledModel(ExactModel(problem), 0.0)
    assert relative_l2(zero, problem) == pytest.approx(1.0, abs=1e-14)


def test_relative_l2_of_poisson_against_its_analytic_solution():
    problem = Poisson()
    points, values = problem.reference()
    assert points.shape == (101 * 101, 2) and points.dtype == torch.float64
    torch.testing.assert_close(values, torch.sin(math.pi * points[:, 0])
                               * torch.sin(math.pi * points[:, 1]))
    assert relative_l2(ScaledModel(ExactModel(problem), 1.01), problem) == pytest.approx(0.01)
    values.zero_()  # a fresh copy: the cached table is untouched
    assert float(problem.reference()[1].abs().max()) == pytest.approx(1.0)
    # A float32 network is evaluated in float32, in batches; the result does not depend on them.
    torch.manual_seed(0)
    model = PinnMLP(input_dim=2, lower=problem.lower, upper=problem.upper)
    error = relative_l2(model, problem)
    assert relative_l2(model, problem, batch=1000) == pytest.approx(error, rel=1e-12)
    with torch.no_grad():
        u = model(points.float()).double().squeeze(1)
    expected = float((u - problem.exact(points)).norm() / problem.exact(points).norm())
    assert error == pytest.approx(expected, rel=1e-12)


# -- the Burgers reference ------------------------------------------------------------------
def test_burgers_reference_grid_initial_and_boundary_values():
    points, values = Burgers().reference()
    assert points.shape == (256 * 100, 2) and values.shape == (256 * 100,)
    x, t = points[:, 0], points[:, 1]
    torch.testing.assert_close(torch.unique(t), torch.arange(100, dtype=torch.float64) / 100)
    torch.testing.assert_close(torch.unique(x), torch.linspace(-1, 1, 256, dtype=torch.float64))
    initial = t == 0
    torch.testing.assert_close(values[initial], -torch.sin(math.pi * x[initial]),
                               rtol=0, atol=1e-14)
    assert float(values[x.abs() == 1].abs().max()) < 1e-12
    assert largest(values) < 1.0 + 1e-12  # maximum principle


def test_burgers_reference_is_converged_in_the_quadrature():
    points, values = burgers_reference_table(NU)
    rows = torch.arange(0, points.shape[0], 7)
    finer = cole_hopf_burgers(points[rows, 0], points[rows, 1], nu=NU, nodes=4801)
    assert float((finer - values[rows]).abs().max()) < 1e-12


def test_burgers_reference_matches_basdevant_max_slope():
    """Basdevant et al. (1986): max_t |∂u/∂x(0, t)| = 152.00516, reached at t = 1.6037/π."""
    t = torch.linspace(0.505, 0.516, 111, dtype=torch.float64)
    x = torch.zeros_like(t, requires_grad=True)
    (slope,) = torch.autograd.grad(cole_hopf_burgers(x, t, nu=NU).sum(), x)
    peak = int(slope.abs().argmax())
    assert 0 < peak < len(t) - 1
    assert float(slope.abs()[peak]) == pytest.approx(152.00516, rel=2e-7)
    assert float(t[peak]) * math.pi == pytest.approx(1.6037, abs=3e-4)


def test_burgers_reference_satisfies_the_pde_by_finite_differences():
    """Central differences (h = 1e-3, second order) on a fine grid away from the shock: the
    residual is below 1e-3 of the viscous term, so even a 0.1 % error in ν would show."""
    h = 1e-3
    x = torch.cat([torch.linspace(-0.9, -0.2, 71), torch.linspace(0.2, 0.9, 71)]).double()
    t = torch.linspace(0.05, 0.95, 46, dtype=torch.float64)
    xx, tt = torch.meshgrid(x, t, indexing="ij")

    def u(dx: float, dt: float) -> torch.Tensor:
        return cole_hopf_burgers(xx + dx, tt + dt, nu=NU)

    centre = u(0, 0)
    u_t = (u(0, h) - u(0, -h)) / (2 * h)
    u_x = (u(h, 0) - u(-h, 0)) / (2 * h)
    u_xx = (u(h, 0) - 2 * centre + u(-h, 0)) / h ** 2
    residual = u_t + centre * u_x - NU * u_xx
    assert largest(u_t) > 1.0 and largest(NU * u_xx) > 0.05  # every term matters here
    assert largest(residual) < 1e-3 * largest(NU * u_xx)


def test_burgers_relative_l2_of_the_reference_formula_is_zero():
    problem = Burgers()
    assert relative_l2(ColeHopfModel(), problem) < 1e-14
    assert relative_l2(ScaledModel(ColeHopfModel(), 0.0), problem) == pytest.approx(1.0)
    assert problem.exact(torch.zeros(1, 2)) is None
