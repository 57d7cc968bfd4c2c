"""Single-process tests of :class:`mlbfgs_hpc.MLBFGS` against the independent references of
``tests/optimizer_oracles.py``:

* textbook L-BFGS — the optimizer with βθ = βg = 0, T = 1, damping = 0, no clip and no outer
  momentum must follow it step for step;
* the dense transcription of DESIGN.md §1 — the optimizer with its default features on (and
  with each step-sizing option) must follow it step for step;
* the EMA buffers, snapshots and the timing of the first pairs, computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mlbfgs_hpc import MLBFGS
from mlbfgs_hpc.config import MLBFGSConfig
from tests.optimizer_oracles import (DenseReference, run_in_lockstep, textbook_lbfgs,
                                     textbook_two_loop)
from tests.optimizer_problems import F64, Quadratic, flat, set_grads


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
            expected = textbook_two_loop([(s, y)], g)   # the pair formed at step 2T shapes step 2T
            np.testing.assert_allclose(step, expected, rtol=1e-9)
            assert not np.allclose(step, g, rtol=1e-3)
