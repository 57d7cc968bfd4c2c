"""Single-process tests of :class:`mlbfgs_hpc.MLBFGS` against independent references.

Oracles (all written here in numpy, sharing no code with the package):

* textbook L-BFGS (Nocedal & Wright, Alg. 7.4/7.5, H0 = γI) — the optimizer with
  βθ = βg = 0, T = 1, damping = 0, no clip and no outer momentum must follow it step for step;
* a dense transcription of DESIGN.md §1 (EMA buffers, snapshots, damping, acceptance, dense
  BFGS inverse Hessian per block, the κ guard, outer momentum, per-group lr/wd) — the
  optimizer with its default features on must follow it step for step;
* ``torch.optim.SGD`` — before the first pair the optimizer is SGD with momentum, so under
  any LR scheduler both must produce the same parameters.

Plus timing of buffers and pairs, checkpoint round trips (bit-identical continuation), param
groups, skipped non-finite steps, the SGD fall-back, counters and buffer stability.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from mlbfgs_hpc import MLBFGS, build_blocks
from mlbfgs_hpc.config import MLBFGSConfig

F64 = torch.float64


# ---- problems -----------------------------------------------------------------------------
def spd_matrix(n: int, low: float, high: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.linspace(low, high, n)) @ q.T


class Quadratic:
    """f(θ) = ½ θᵀAθ − bᵀθ over a flat vector split into parameter tensors.

    ``noise`` > 0 adds a fixed, seeded perturbation per step to the gradient (the same for
    the optimizer and the reference), which makes pairs noisy enough to exercise damping.
    """

    def __init__(self, sizes: Sequence[int], *, low: float, high: float, seed: int,
                 noise: float = 0.0, coupled: bool = True) -> None:
        n = sum(sizes)
        rng = np.random.default_rng(seed + 1)
        self.sizes = list(sizes)
        if coupled:
            self.a = spd_matrix(n, low, high, seed)
        else:  # block-diagonal: the blocks are independent problems
            self.a = np.zeros((n, n))
            for i, sl in enumerate(self.slices()):
                self.a[sl, sl] = spd_matrix(sl.stop - sl.start, low, high, seed + 10 * i)
        self.b = rng.standard_normal(n)
        self.theta0 = rng.standard_normal(n)
        self.noise = noise
        self._noise_rng = np.random.default_rng(seed + 2)
        self._noise_cache: list[np.ndarray] = []

    def grad(self, theta: np.ndarray, call: int) -> np.ndarray:
        g = self.a @ theta - self.b
        if self.noise:
            while len(self._noise_cache) <= call:
                self._noise_cache.append(self._noise_rng.standard_normal(len(theta)))
            g = g + self.noise * self._noise_cache[call]
        return g

    def params(self) -> list[nn.Parameter]:
        chunks = np.split(self.theta0, np.cumsum(self.sizes)[:-1])
        return [nn.Parameter(torch.tensor(c, dtype=F64)) for c in chunks]

    def slices(self) -> list[slice]:
        edges = np.concatenate([[0], np.cumsum(self.sizes)])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def flat(params: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()


def set_grads(params: Sequence[torch.Tensor], g: np.ndarray) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = torch.tensor(g[offset:offset + n], dtype=p.dtype).view_as(p)
        offset += n


# ---- oracle 1: textbook L-BFGS --------------------------------------------------------------
def textbook_lbfgs(problem: Quadratic, *, steps: int, lr: float, m: int) -> list[np.ndarray]:
    """L-BFGS with fixed step ``lr``, independently per block, pairs from consecutive iterates."""
    x = problem.theta0.copy()
    xs = [x.copy()]
    history: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in problem.slices()]
    x_prev = g_prev = None
    for k in range(steps):
        g = problem.grad(x, k)
        d = g.copy()
        for b, sl in enumerate(problem.slices()):
            if x_prev is not None:
                history[b].append((x[sl] - x_prev[sl], g[sl] - g_prev[sl]))
                del history[b][:-m]
            if history[b]:
                d[sl] = _two_loop(history[b], g[sl])
        x_prev, g_prev = x.copy(), g
        x = x - lr * d
        xs.append(x.copy())
    return xs


def _two_loop(pairs: list[tuple[np.ndarray, np.ndarray]], g: np.ndarray) -> np.ndarray:
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        r += s * (a - (y @ r) / (s @ y))
    return r


# ---- oracle 2: dense mL-BFGS (DESIGN.md §1) -------------------------------------------------
class DenseReference:
    """DESIGN.md §1 in plain numpy with a dense inverse Hessian per block."""

    def __init__(self, *, slices: list[slice], lr: np.ndarray, wd: np.ndarray, m: int, T: int,
                 beta_param: float, beta_grad: float, damping: float, sigma_low: float,
                 sigma_high: float, eps: float, clip: str, kappa: float, momentum: float,
                 nesterov: bool, double_damping: float = 0.0) -> None:
        self.slices, self.lr, self.wd, self.m, self.T = slices, lr, wd, m, T
        self.bp, self.bg, self.tau0 = beta_param, beta_grad, 1.0 - damping
        self.sl, self.sh, self.eps = sigma_low, sigma_high, eps
        self.clip, self.kappa, self.mom, self.nesterov = clip, kappa, momentum, nesterov
        self.mu1 = double_damping
        self.moved_towards_h_y = 0   # pairs whose s double damping changed
        self.t = 0
        self.history: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in slices]
        self.accepted = self.rejected = self.fallbacks = 0
        self.nu = 1.0
        self.last_direction = np.zeros(0)

    def step(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        g = grad + self.wd * theta
        if self.t == 1:
            self.mp, self.mg = theta.copy(), g.copy()
        else:
            self.mp = self.bp * self.mp + (1 - self.bp) * theta
            self.mg = self.bg * self.mg + (1 - self.bg) * g
        if self.t % self.T == 0:
            if self.t >= 2 * self.T:
                for b, sl in enumerate(self.slices):
                    self._offer(b, self.mp[sl] - self.pp[sl], self.mg[sl] - self.pg[sl])
            self.pp, self.pg = self.mp.copy(), self.mg.copy()
        d = g.copy()
        self.cosines = []
        for b, sl in enumerate(self.slices):
            if self.history[b]:
                d[sl] = self._dense_h(b) @ g[sl]
                self.cosines.append(float(g[sl] @ d[sl]) / float(
                    np.linalg.norm(g[sl]) * np.linalg.norm(d[sl])))
        self.nu = 1.0
        if any(self.history):
            gd = float(g @ d)
            if not math.isfinite(gd) or gd <= 0:
                d = g.copy()
                self.fallbacks += 1
            elif self.clip == "kl":
                self.nu = min(1.0, math.sqrt(self.kappa / gd))
                d = self.nu * d
            elif self.clip == "graft":  # each curved block's H·g at its gradient's norm
                for b, sl in enumerate(self.slices):
                    if self.history[b]:
                        d[sl] *= np.linalg.norm(g[sl]) / np.linalg.norm(d[sl])
            elif self.clip == "graft-global":  # the whole direction at the whole g's norm
                d *= np.linalg.norm(g) / np.linalg.norm(d)
        self.last_direction, self.last_gradient = d, g
        if self.mom == 0:
            v = d
        else:
            self.buf = d.copy() if self.t == 1 else self.mom * self.buf + d
            v = d + self.mom * self.buf if self.nesterov else self.buf
        return theta - self.lr * v

    def _offer(self, b: int, s: np.ndarray, y: np.ndarray) -> None:
        if self.mu1 > 0 and self.history[b]:
            # Double damping's first stage, with the block's dense H: s moves towards H·y
            # until sᵀy = μ1·yᵀHy (Goldfarb, Ren and Bahamou 2020).
            h_y = self._dense_h(b) @ y
            sy, yhy = float(s @ y), float(y @ h_y)
            if yhy > 0 and sy < self.mu1 * yhy:
                theta = (1 - self.mu1) * yhy / (yhy - sy)
                s = theta * s + (1 - theta) * h_y
                self.moved_towards_h_y += 1
        ss, sy = float(s @ s), float(s @ y)
        mu = sy / ss if ss > 0 else math.nan
        if mu < self.sl:
            tau = min((1 - self.sl) / (1 - mu), self.tau0)
        elif mu > self.sh:
            tau = min((self.sh - 1) / (mu - 1), self.tau0)
        else:
            tau = self.tau0
        yhat = tau * y + (1 - tau) * s if math.isfinite(mu) else y
        syh = float(s @ yhat)
        if np.isfinite([ss, syh, float(yhat @ yhat)]).all() and ss > 0 and syh > self.eps * ss:
            self.history[b].append((s.copy(), yhat))
            del self.history[b][:-self.m]
            self.accepted += 1
        else:
            self.rejected += 1

    def _dense_h(self, b: int) -> np.ndarray:
        pairs = self.history[b]
        s, y = pairs[-1]
        n = len(s)
        h = (s @ y) / (y @ y) * np.eye(n)
        for s, y in pairs:
            rho = 1.0 / (s @ y)
            v = np.eye(n) - rho * np.outer(y, s)
            h = v.T @ h @ v + rho * np.outer(s, s)
        return h


def run_in_lockstep(problem: Quadratic, params: list[nn.Parameter], opt: MLBFGS,
                    ref: DenseReference, *, steps: int, check: Callable[[int], None]) -> None:
    """Step the optimizer and the reference on the same gradients; parameters must agree
    after every step, then ``check(step)`` compares whatever else the test is about."""
    theta = problem.theta0.copy()
    for k in range(steps):
        g = problem.grad(theta, k)
        set_grads(params, g)
        opt.step()
        theta = ref.step(theta, g)
        np.testing.assert_allclose(flat(params), theta, rtol=1e-8, atol=1e-10,
                                   err_msg=f"after step {k + 1}")
        check(k)


# ---- textbook L-BFGS ------------------------------------------------------------------------
TEXTBOOK = {"beta_param": 0.0, "beta_grad": 0.0, "update_freq": 1, "damping": 0.0,
            "clip": "none", "momentum": 0.0, "double_damping": 0.0}


def test_warmup_step_is_the_gradient() -> None:
    problem = Quadratic([7], low=0.05, high=1.2, seed=0)
    params = problem.params()
    opt = MLBFGS(params, lr=0.3, **TEXTBOOK)
    g = problem.grad(problem.theta0, 0)
    set_grads(params, g)
    opt.step()
    expected = torch.tensor(problem.theta0, dtype=F64) - torch.tensor(g, dtype=F64) * 0.3
    assert torch.equal(params[0].detach(), expected)   # d = g, bit for bit
    assert opt.counters["accepted_pairs"] == 0


@pytest.mark.parametrize("sizes", [[30], [12, 10, 8]], ids=["one-block", "three-blocks"])
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_follows_textbook_lbfgs(sizes: list[int], lr: float) -> None:
    steps, m = 20, 5
    # Eigenvalues in [0.05, 1.2] ⊂ [σL, σH] and A block-diagonal along the blocks: every
    # block's Rayleigh quotient sᵀy/sᵀs is inside the damping bounds, so damping = 0 leaves
    # each pair exactly as textbook L-BFGS (run per block) forms it.
    problem = Quadratic(sizes, low=0.05, high=1.2, seed=1, coupled=False)
    expected = textbook_lbfgs(problem, steps=steps, lr=lr, m=m)
    params = problem.params()
    opt = MLBFGS(params, lr=lr, history_size=m, **TEXTBOOK)
    for k in range(steps):
        np.testing.assert_allclose(flat(params), expected[k], rtol=1e-9, atol=1e-11,
                                   err_msg=f"before step {k + 1}")
        set_grads(params, problem.grad(flat(params), k))
        opt.step()
        # With T = 1 the first pair forms at step 2 (snapshots of steps 1 and 2).
        assert opt.counters["accepted_pairs"] == len(sizes) * k
    np.testing.assert_allclose(flat(params), expected[steps], rtol=1e-9, atol=1e-11)
    assert opt.counters["rejected_pairs"] == 0 and opt.counters["sgd_fallbacks"] == 0
    # The run made real progress (so the comparison is not between two converged points).
    g_end = np.linalg.norm(problem.grad(flat(params), 0))
    assert 1e-8 < g_end < 1e-2 * np.linalg.norm(problem.grad(problem.theta0, 0))


# ---- full algorithm vs the dense reference --------------------------------------------------
@pytest.mark.parametrize("nesterov", [False, True])
def test_follows_dense_reference_with_all_features(nesterov: bool) -> None:
    """Defaults on (damping, double damping, κ guard, momentum), weight decay and two groups,
    noisy gradients."""
    sizes = [9, 5, 6]
    problem = Quadratic(sizes, low=0.002, high=3.0, seed=4, noise=0.3)
    params = problem.params()
    groups = [{"params": params[:2]},
              {"params": params[2:], "lr": 0.02, "weight_decay": 0.05}]
    kw: dict[str, Any] = {"history_size": 3, "update_freq": 3, "beta_param": 0.9,
                          "beta_grad": 0.9, "damping": 0.2, "sigma_low": 0.01,
                          "sigma_high": 1.5, "curvature_eps": 1e-8, "clip": "kl",
                          "kl_clip": 0.005, "momentum": 0.9, "nesterov": nesterov,
                          "double_damping": 0.2}
    opt = MLBFGS(groups, lr=0.05, weight_decay=0.01, **kw)
    lr = np.concatenate([np.full(9 + 5, 0.05), np.full(6, 0.02)])
    wd = np.concatenate([np.full(9 + 5, 0.01), np.full(6, 0.05)])
    ref = DenseReference(slices=problem.slices(), lr=lr, wd=wd, m=3, T=3, beta_param=0.9,
                         beta_grad=0.9, damping=0.2, sigma_low=0.01, sigma_high=1.5, eps=1e-8,
                         clip="kl", kappa=0.005, momentum=0.9, nesterov=nesterov,
                         double_damping=0.2)
    clipped = 0

    def check(_: int) -> None:
        nonlocal clipped
        c = opt.counters
        assert (c["accepted_pairs"], c["rejected_pairs"], c["sgd_fallbacks"]) == (
            ref.accepted, ref.rejected, ref.fallbacks)
        assert c["last_nu"] == pytest.approx(ref.nu, rel=1e-8)
        clipped += ref.nu < 1.0

    run_in_lockstep(problem, params, opt, ref, steps=45, check=check)
    # The run exercised what it claims to: pairs in every block, wrapped rings, the guard.
    assert ref.accepted == 3 * (45 // 3 - 1) and all(len(h) == 3 for h in ref.history)
    assert clipped > 0 and ref.moved_towards_h_y > 0


def test_follows_dense_reference_with_grafting() -> None:
    """Per-block grafting: each block's H·g rescaled to its own gradient's norm; the
    diagnostics report the cosines of the un-grafted directions."""
    sizes = [9, 5, 6]
    problem = Quadratic(sizes, low=0.002, high=3.0, seed=5, noise=0.3)
    params = problem.params()
    kw: dict[str, Any] = {"history_size": 3, "update_freq": 3, "damping": 0.05,
                          "clip": "graft", "momentum": 0.9}   # double damping: the default
    opt = MLBFGS(params, lr=0.05, weight_decay=0.01, **kw)
    ref = DenseReference(slices=problem.slices(), lr=np.full(20, 0.05), wd=np.full(20, 0.01),
                         m=3, T=3, beta_param=0.9, beta_grad=0.9, damping=0.05,
                         sigma_low=0.01, sigma_high=1.5, eps=1e-8, clip="graft", kappa=0.0,
                         momentum=0.9, nesterov=False,
                         double_damping=MLBFGSConfig().double_damping)
    bent = 0

    def check(_: int) -> None:
        nonlocal bent
        diag = opt.diagnostics
        if ref.cosines:
            assert diag["cos_mean"] == pytest.approx(np.mean(ref.cosines), rel=1e-9)
            assert diag["cos_min"] == pytest.approx(min(ref.cosines), rel=1e-9)
            # Grafted: the applied direction has exactly the gradient's norm.
            assert diag["step_scale"] == pytest.approx(1.0, rel=1e-12)
            assert opt.counters["last_nu"] == 1.0
            bent += min(ref.cosines) < 0.9
        else:
            assert math.isnan(diag["cos_mean"]) and math.isnan(diag["hg_ratio"])

    run_in_lockstep(problem, params, opt, ref, steps=45, check=check)
    # The curvature really bent the directions (else grafting would be a no-op test).
    assert bent > 10 and ref.accepted == 3 * (45 // 3 - 1)


def test_follows_dense_reference_with_one_global_graft_factor() -> None:
    """``clip="graft-global"``: the whole direction rescaled by one factor to the whole
    gradient's norm, so the blocks keep the relative lengths H gives them (unlike per-block
    grafting, where every block's step has its own gradient's length)."""
    sizes = [9, 5, 6]
    problem = Quadratic(sizes, low=0.002, high=3.0, seed=5, noise=0.3)
    params = problem.params()
    opt = MLBFGS(params, lr=0.05, weight_decay=0.01, history_size=3, update_freq=3,
                 damping=0.05, clip="graft-global", momentum=0.9)
    ref = DenseReference(slices=problem.slices(), lr=np.full(20, 0.05), wd=np.full(20, 0.01),
                         m=3, T=3, beta_param=0.9, beta_grad=0.9, damping=0.05,
                         sigma_low=0.01, sigma_high=1.5, eps=1e-8, clip="graft-global",
                         kappa=0.0, momentum=0.9, nesterov=False,
                         double_damping=MLBFGSConfig().double_damping)
    uneven = spread_checked = 0

    def check(_: int) -> None:
        nonlocal uneven, spread_checked
        if not ref.cosines:
            return
        assert opt.diagnostics["step_scale"] == pytest.approx(1.0, rel=1e-12)
        g = ref.last_gradient
        lengths = [np.linalg.norm(ref.last_direction[sl]) / np.linalg.norm(g[sl])
                   for sl in problem.slices()]
        uneven += max(lengths) > 1.5 * min(lengths)   # per-block grafting: all exactly 1
        if len(ref.cosines) == len(sizes):   # every block curved: the logged spread of
            # ‖H·g‖/‖g‖ is the applied lengths' spread (one factor scales them all)
            diag = opt.diagnostics
            assert diag["hg_ratio_max"] / diag["hg_ratio_min"] == pytest.approx(
                max(lengths) / min(lengths), rel=1e-9)
            spread_checked += 1

    run_in_lockstep(problem, params, opt, ref, steps=45, check=check)
    assert uneven > 10 and spread_checked > 10 and ref.accepted == 3 * (45 // 3 - 1)


def test_damping_changes_the_trajectory_like_the_reference() -> None:
    """An ill-conditioned problem pushes μ outside [σL, σH]; damping must act as specified."""
    problem = Quadratic([10], low=1e-3, high=6.0, seed=8, noise=0.5)
    params = problem.params()
    opt = MLBFGS(params, lr=0.05, history_size=4, update_freq=2, clip="none", momentum=0.0)
    ref = DenseReference(slices=problem.slices(), lr=np.full(10, 0.05), wd=np.zeros(10), m=4,
                         T=2, beta_param=0.9, beta_grad=0.9, damping=0.2, sigma_low=0.01,
                         sigma_high=1.5, eps=1e-8, clip="none", kappa=0.0, momentum=0.0,
                         nesterov=False)
    theta = problem.theta0.copy()
    snapshots: list[tuple[np.ndarray, np.ndarray]] = []
    for k in range(30):
        g = problem.grad(theta, k)
        set_grads(params, g)
        opt.step()
        theta = ref.step(theta, g)
        if ref.t % 2 == 0:
            snapshots.append((ref.mp.copy(), ref.mg.copy()))
        np.testing.assert_allclose(flat(params), theta, rtol=1e-8, atol=1e-10)
    mus = [float((p1 - p0) @ (g1 - g0)) / float((p1 - p0) @ (p1 - p0))
           for (p0, g0), (p1, g1) in zip(snapshots, snapshots[1:])]
    assert any(mu > 1.5 or mu < 0.01 for mu in mus), mus  # a bound actually bound


# ---- timing of buffers and pairs ------------------------------------------------------------
def test_buffers_snapshots_and_pair_timing() -> None:
    T, lr, beta = 3, 0.1, 0.9
    problem = Quadratic([6], low=0.2, high=1.0, seed=2)
    params = problem.params()
    opt = MLBFGS(params, lr=lr, update_freq=T, beta_param=beta, beta_grad=beta, damping=0.0,
                 clip="none", momentum=0.0, history_size=5)
    mp = mg = snap_p = snap_g = None
    for t in range(1, 4 * T + 1):
        theta = flat(params)
        g = problem.grad(theta, t)
        set_grads(params, g)
        opt.step()
        # Normalised EMAs initialised to the first value.
        mp = theta.copy() if t == 1 else beta * mp + (1 - beta) * theta
        mg = g.copy() if t == 1 else beta * mg + (1 - beta) * g
        state = opt.block_state(0)
        np.testing.assert_allclose(state["m_param"].numpy(), mp, rtol=1e-13)
        np.testing.assert_allclose(state["m_grad"].numpy(), mg, rtol=1e-13)
        pair = None
        if t % T == 0:
            if snap_p is not None:
                pair = (mp - snap_p, mg - snap_g)
            snap_p, snap_g = mp.copy(), mg.copy()
        if snap_p is None:
            assert not state["snap_param"].any()
        else:
            np.testing.assert_allclose(state["snap_param"].numpy(), snap_p, rtol=1e-13)
            np.testing.assert_allclose(state["snap_grad"].numpy(), snap_g, rtol=1e-13)
        # Pairs at 2T, 3T, ... only.
        assert opt.counters["accepted_pairs"] == max(0, t // T - 1), t
        step = (theta - flat(params)) / lr
        if t < 2 * T:
            np.testing.assert_allclose(step, g, rtol=1e-12)              # d = g before a pair
        elif t == 2 * T:
            assert pair is not None
            s, y = pair
            mu = float(s @ y) / float(s @ s)
            assert 0.01 <= mu <= 1.5            # no damping acts with damping = 0 here
            expected = _two_loop([(s, y)], g)   # the pair formed at step 2T shapes step 2T
            np.testing.assert_allclose(step, expected, rtol=1e-9)
            assert not np.allclose(step, g, rtol=1e-3)


# ---- checkpoints ----------------------------------------------------------------------------
def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen))
            for _ in range(count)]


def train(model: nn.Module, opt: MLBFGS, sched: Any,
          data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def make_opt(model: nn.Module) -> tuple[MLBFGS, Any]:
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, weight_decay=1e-3,
                 history_size=3, update_freq=2, kl_clip=0.05)
    return opt, lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)


def test_checkpoint_round_trip_continues_bit_identically() -> None:
    data = batches(24)
    model = make_mlp(0)
    opt, sched = make_opt(model)
    train(model, opt, sched, data)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = make_mlp(0)
    opt, sched = make_opt(model)
    train(model, opt, sched, data[:12])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    # Pairs exist and every ring wrapped (pairs at t = 4, 6, ..., 12: 5 > m = 3).
    for block_state in opt.state_dict()["state"].values():
        assert int(block_state["count"]) == 3 and int(block_state["accepted"]) == 5
        assert int(block_state["head"]) == 5 % 3
    del model, opt, sched

    buf.seek(0)
    ckpt = torch.load(buf)  # the default (weights_only) loader: plain tensors and containers
    model = make_mlp(99)    # different initialisation: everything must come from the checkpoint
    opt, sched = make_opt(model)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    train(model, opt, sched, data[12:])
    for a, b in zip(uninterrupted, model.parameters()):
        assert torch.equal(a, b.detach())
    assert opt.counters["step"] == 24


def test_state_dict_is_a_snapshot_not_a_view() -> None:
    data = batches(8)
    model = make_mlp(0)
    opt, sched = make_opt(model)
    train(model, opt, sched, data[:5])
    saved = opt.state_dict()
    frozen = {b: {k: v.clone() for k, v in s.items()} for b, s in saved["state"].items()}
    train(model, opt, sched, data[5:])
    for b, s in saved["state"].items():
        for k, v in s.items():
            assert torch.equal(v, frozen[b][k]), (b, k)


def test_load_state_dict_rejects_other_blocks() -> None:
    model = make_mlp(0)
    opt, _ = make_opt(model)
    other = MLBFGS(model.parameters(), blocks=build_blocks(model, block_size=60))
    with pytest.raises(ValueError, match="blocks"):
        other.load_state_dict(opt.state_dict())


# ---- param groups and schedulers ------------------------------------------------------------
def test_param_groups_follow_their_lr_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    frozen0 = [p.detach().clone() for p in model[0].parameters()]
    opt = MLBFGS([{"params": model[0].parameters(), "lr": 0.0},
                  {"params": model[2].parameters(), "weight_decay": 0.1}],
                 lr=0.05, momentum=0.0, update_freq=1000)
    x, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model[2].parameters()]
    grads = [p.grad.clone() for p in model[2].parameters()]
    opt.step()
    for p, p0, g in zip(model[2].parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.05 * (g + 0.1 * p0), rtol=1e-14, atol=0)
    for p, p0 in zip(model[0].parameters(), frozen0):
        assert torch.equal(p.detach(), p0)


def test_zero_lr_group_stays_put_with_curvature_and_a_shared_block() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    start = [p.detach().clone() for p in model.parameters()]
    # One block spans both groups: the lr is applied per group segment inside the block.
    blocks = build_blocks(model, block_size=10_000)
    assert len(blocks) == 1
    opt = MLBFGS([{"params": model[0].parameters()},
                  {"params": model[2].parameters(), "lr": 0.0}],
                 blocks=blocks, lr=0.1, update_freq=2, history_size=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(10, 4, generator=gen, dtype=F64), torch.randn(10, 2, generator=gen,
                                                                         dtype=F64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.counters["accepted_pairs"] > 3
    assert not torch.equal(model[0].weight.detach(), start[0])
    for p, p0 in zip(model[2].parameters(), start[2:]):
        assert torch.equal(p.detach(), p0)


def test_add_param_group_after_construction_is_refused() -> None:
    opt = MLBFGS([nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts":
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.95),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=6),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=10, power=2.0),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12,
                                                    cycle_momentum=False),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=3,
                                                cycle_momentum=False),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
         lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_warmup_equals_sgd_under_every_scheduler(name: str, nesterov: bool) -> None:
    """Before the first pair the step is SGD with momentum, at the group's current lr."""
    torch.manual_seed(0)
    ref_model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model.load_state_dict(ref_model.state_dict())
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov}
    sgd = torch.optim.SGD(ref_model.parameters(), **kw)
    opt = MLBFGS(model.parameters(), update_freq=1000, **kw)
    scheds = [SCHEDULERS[name](sgd), SCHEDULERS[name](opt)]
    gen = torch.Generator().manual_seed(0)
    lrs: list[tuple[float, float]] = []
    for _ in range(12):
        x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen,
                                                                        dtype=F64)
        losses = []
        for m, o, s in ((ref_model, sgd, scheds[0]), (model, opt, scheds[1])):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
        lrs.append((sgd.param_groups[0]["lr"], opt.param_groups[0]["lr"]))
        for (m, o, s), loss in zip(((ref_model, sgd, scheds[0]), (model, opt, scheds[1])),
                                   losses):
            if isinstance(s, lr_scheduler.ReduceLROnPlateau):
                s.step(loss)
            else:
                s.step()
    assert [a for a, _ in lrs] == [b for _, b in lrs]
    assert len({a for a, _ in lrs}) > 1                        # the schedule did change lr
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.xfail(strict=True, raises=ValueError,
                   reason="momentum is an MLBFGS constructor constant, not a param-group key, "
                          "so OneCycleLR/CyclicLR with the default cycle_momentum=True refuse it")
def test_one_cycle_with_cycle_momentum() -> None:
    opt = MLBFGS([nn.Parameter(torch.zeros(2))])
    lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)


# ---- non-finite gradients -------------------------------------------------------------------
def test_non_finite_gradient_skips_the_step_and_never_enters_history() -> None:
    data = batches(14)

    def run(poison_after: int | None) -> tuple[nn.Module, MLBFGS]:
        model = make_mlp(3)
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                     history_size=3)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if i == poison_after:
                for bad in (math.nan, math.inf, -math.inf):
                    before = [p.detach().clone() for p in model.parameters()]
                    state_before = opt.state_dict()
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    model[2].weight.grad[1, 1] = bad
                    opt.step()
                    for p, p0 in zip(model.parameters(), before):
                        assert torch.equal(p.detach(), p0)
                    after = opt.state_dict()
                    for b, s in state_before["state"].items():
                        for k, v in s.items():
                            assert torch.equal(after["state"][b][k], v), (b, k)
        return model, opt

    clean_model, clean_opt = run(None)
    model, opt = run(poison_after=6)            # history exists at step 7 (pairs at 4, 6)
    c = opt.counters
    assert c["skipped_steps"] == 3 and c["step"] == len(data)
    assert clean_opt.counters["skipped_steps"] == 0
    for p, q in zip(clean_model.parameters(), model.parameters()):
        assert torch.equal(p, q)                # a skipped step is a pure no-op
    for b in opt.owned_blocks:
        state = opt.block_state(b)
        assert all(torch.isfinite(state[k]).all() for k in ("S", "Y", "rho", "gamma"))


def test_closure_is_called_and_its_loss_returned() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, -1.6], dtype=F64))


# ---- counters and the SGD fall-back ---------------------------------------------------------
def test_counters_are_readable_and_consistent() -> None:
    data = batches(21)
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=4,
                 history_size=2)
    fresh = opt.counters
    assert fresh == {"step": 0, "skipped_steps": 0, "sgd_fallbacks": 0, "accepted_pairs": 0,
                     "rejected_pairs": 0, "last_nu": 1.0, "last_gamma": fresh["last_gamma"]}
    assert math.isnan(fresh["last_gamma"])
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    c = opt.counters
    assert all(isinstance(c[k], int) for k in ("step", "skipped_steps", "sgd_fallbacks",
                                               "accepted_pairs", "rejected_pairs"))
    assert all(isinstance(c[k], float) for k in ("last_nu", "last_gamma"))
    n_blocks = len(opt.blocks)
    assert n_blocks == 3
    assert c["step"] == 21
    assert c["accepted_pairs"] + c["rejected_pairs"] == n_blocks * (21 // 4 - 1)
    assert 0.0 < c["last_nu"] <= 1.0
    gammas = [float(opt.block_state(b)["gamma"]) for b in range(n_blocks)]
    assert c["last_gamma"] == pytest.approx(sum(gammas) / n_blocks, rel=1e-6)
    assert opt.optimizer_state_bytes() > 0


def _install_pair(opt: MLBFGS, s: torch.Tensor, y: torch.Tensor, rho: float,
                  gamma: float) -> None:
    """Put one (possibly invalid) pair into block 0's ring through load_state_dict."""
    sd = opt.state_dict()
    st = sd["state"][0]
    st["S"][0] = s
    st["Y"][0] = y
    st["rho"][0] = rho
    st["gamma"].fill_(gamma)
    st["head"].fill_(1)
    st["count"].fill_(1)
    opt.load_state_dict(sd)


@pytest.mark.parametrize("case", ["negative-curvature", "non-finite"])
def test_sgd_fallback_when_direction_is_not_descent(case: str) -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    if case == "negative-curvature":
        _install_pair(opt, e1, -e1, rho=-1.0, gamma=-1.0)   # H = −I: gᵀHg < 0
    else:
        _install_pair(opt, e1, e1, rho=math.inf, gamma=1.0)  # H·g non-finite
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 1
    assert opt.counters["last_nu"] == 1.0
    assert torch.equal(p.detach(), -(g * 0.1))              # d = g
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 2


def test_good_curvature_is_not_a_fallback() -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000, clip="none")
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    _install_pair(opt, e1, 2 * e1, rho=0.5, gamma=0.5)      # H = ½ I
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 0
    torch.testing.assert_close(p.detach(), -(0.1 * 0.5 * g))


def test_kl_guard_value() -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=1.0, momentum=0.0, update_freq=1000, clip="kl", kl_clip=0.01)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    _install_pair(opt, e1, 2 * e1, rho=0.5, gamma=0.5)      # H = ½ I, gᵀd = ½‖g‖²
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    nu = math.sqrt(0.01 / (0.5 * float(g @ g)))
    assert opt.counters["last_nu"] == pytest.approx(nu, rel=1e-12)
    torch.testing.assert_close(p.detach(), -(nu * 0.5 * g))


# ---- no per-step allocation of optimizer state ----------------------------------------------
def test_internal_buffers_are_allocated_once() -> None:
    data = batches(13)
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                 history_size=2)

    def pointers() -> dict[str, int]:
        tensors = {"grad": opt._grad, "param": opt._param, "direction": opt._direction,
                   "update": opt._update, "scratch_s": opt._scratch_s,
                   "scratch_y": opt._scratch_y,
                   **{f"flat.{k}": v for k, v in opt._flat_state.items()},
                   **{f"global.{k}": v for k, v in opt._global.items()}}
        for b, curv in opt._curvature.items():
            tensors.update({f"{b}.{k}": v for k, v in curv.state_tensors().items()})
        tensors.update({f"param{i}": p for i, p in enumerate(model.parameters())})
        return {k: v.data_ptr() for k, v in tensors.items()}

    seen = None
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if i == 0:
            seen = pointers()
    assert opt.counters["accepted_pairs"] > 2 * len(opt.blocks)  # rings wrapped meanwhile
    assert pointers() == seen


def test_step_allocation_does_not_grow_with_model_size() -> None:
    """Per-step temporaries are O(#blocks) scalars, never O(#parameters).

    A step that accepts pairs also rebuilds each block's compact-form matrix W: float64
    matrices of (2m)² entries and the Gram matrices, O(#blocks · m²), still independent of
    the number of parameters."""
    allocated = {}
    for width in (16, 512):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=2,
                     history_size=3)
        x, y = torch.randn(8, width), torch.randn(8, 10)
        for t in range(1, 13):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if t < 11:
                opt.step()
                continue
            # Step 11 is a plain curvature step, step 12 also forms pairs.
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
                opt.step()
            allocated[(width, t)] = sum(e.cpu_memory_usage for e in prof.events()
                                        if e.cpu_memory_usage > 0)
    assert opt.counters["accepted_pairs"] > 0
    n_big = sum(p.numel() for p in model.parameters())
    assert max(allocated[(16, 11)], allocated[(512, 11)]) < 1024 < n_big, allocated
    assert max(allocated[(16, 12)], allocated[(512, 12)]) < 16 * 1024 < 4 * n_big, allocated
    # Same blocks and history, 30x the parameters: the same allocations, give or take the
    # few bytes of scalars whose values differ.
    for t in (11, 12):
        assert abs(allocated[(512, t)] - allocated[(16, t)]) <= 64, allocated


def test_huge_but_finite_gradient_is_not_skipped() -> None:
    """The finiteness check must not mistake an overflowing sum of finite entries for NaN."""
    p = nn.Parameter(torch.zeros(4))
    opt = MLBFGS([p], lr=0.0)
    p.grad = torch.full((4,), 3e38)                        # finite; the float32 sum is inf
    opt.step()
    assert opt.counters["skipped_steps"] == 0 and opt.counters["step"] == 1
    p.grad = torch.tensor([3e38, -3e38, math.inf, 0.0])   # one Inf entry: skipped
    opt.step()
    assert opt.counters["skipped_steps"] == 1


def test_pair_momentum_offers_the_ema_of_successive_pairs() -> None:
    """``pair_momentum=p``: the pair offered at the k-th pair step is s̄ₖ = p·s̄ₖ₋₁ + (1−p)·sₖ
    (s̄₁ = s₁), sₖ = Mθ − snapshot as without it; on a quadratic ȳ = A·s̄ is accepted, and the
    ring's newest row is s̄ₖ. The default (0) offers the raw pairs."""
    n, period, beta, p = 6, 2, 0.9, 0.5
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = basis @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=torch.float64)) @ basis.T
    target = torch.randn(n, generator=gen, dtype=torch.float64)
    for pair_momentum in (p, 0.0):
        theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        opt = MLBFGS([theta], lr=0.1, update_freq=period, beta_param=beta, beta_grad=beta,
                     damping=0.0, momentum=0.0, pair_momentum=pair_momentum)
        smoothed: torch.Tensor | None = None
        offered = 0
        for t in range(1, 6 * period + 1):
            state = opt.block_state(0)
            m_param = (theta.detach().clone() if t == 1 else
                       state["m_param"].clone().lerp_(theta.detach(), 1.0 - beta))
            snapshot = state["snap_param"].clone()
            theta.grad = hessian @ theta.detach() - target
            opt.step()
            if t % period or t < 2 * period:
                continue
            raw = m_param - snapshot
            smoothed = raw if smoothed is None else smoothed * p + raw * (1.0 - p)
            offered += 1
            curvature = opt._curvature[0]
            newest = (int(curvature.head) - 1) % curvature.history_size
            expected = smoothed if pair_momentum else raw
            torch.testing.assert_close(curvature.S[newest], expected, rtol=1e-12, atol=1e-14)
        assert offered == 5 and opt.counters["accepted_pairs"] == 5
        assert not torch.allclose(smoothed, raw)   # the EMA did differ from the raw pair
