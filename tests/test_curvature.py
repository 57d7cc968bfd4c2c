"""Tests of the per-block curvature code (``mlbfgs_hpc.curvature``).

* ``H·q`` (:meth:`BlockCurvature.apply_inverse_hessian_`, the compact form) and the two-loop
  recursion (:meth:`BlockCurvature.two_loop_`) against the dense BFGS inverse-Hessian
  recursion ``H ← (I − ρ s yᵀ) H (I − ρ y sᵀ) + ρ s sᵀ`` from ``H0 = γ I`` (γ of the newest
  pair), in float64, before and after the ring wraps; the two forms against each other in
  float64 and float32.
* The damping formula (DESIGN.md §1.4) on hand-computed cases at both bounds and between.
* Double damping's first stage (s moved towards H·y so that sᵀy ≥ μ1·yᵀHy) against the
  dense inverse Hessian of the pairs already stored, and its θ on hand-computed cases.
* Pair rejection (non-finite, ``sᵀŷ <= ε sᵀs``, ``s = 0``): counted, never stored.
* Both forms allocate no memory per call (torch.profiler); the compact form issues the same
  few kernels whatever the block size and the history length, the two-loop a number that
  grows with the stored pairs only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mlbfgs_hpc.config import MLBFGSConfig
from mlbfgs_hpc.curvature import (
    CURVATURE_STATE_KEYS, BlockCurvature, compact_middle_matrix, damp_pair_, damping_factor,
    inverse_damping_factor)

F64 = torch.float64
CPU = torch.device("cpu")
# Leaves every positive-curvature pair untouched (τ = 1): the oracle sees the offered pairs.
NO_DAMPING = MLBFGSConfig(damping=0.0, sigma_low=0.0, sigma_high=1e12, double_damping=0.0)


def dense_inverse_hessian(pairs: list[tuple[np.ndarray, np.ndarray]], n: int) -> np.ndarray:
    """Dense BFGS inverse-Hessian from ``γ I`` through the pairs, oldest first."""
    s_new, y_new = pairs[-1]
    gamma = float(s_new @ y_new) / float(y_new @ y_new)
    h = gamma * np.eye(n)
    eye = np.eye(n)
    for s, y in pairs:
        rho = 1.0 / float(s @ y)
        v = eye - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def positive_pairs(count: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Random pairs with sᵀy > 0: y = A s + small noise, A symmetric positive definite."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(-1, 1, n, dtype=F64)) @ q.T
    pairs = []
    for _ in range(count):
        s = torch.randn(n, generator=gen, dtype=F64)
        y = a @ s + 0.05 * torch.randn(n, generator=gen, dtype=F64)
        assert float(s @ y) > 0
        pairs.append((s, y))
    return pairs


def diagonal_pairs(count: int, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cheap positive pairs for large n: y = D s with D diagonal in [0.1, 10]."""
    gen = torch.Generator().manual_seed(seed)
    diag = torch.logspace(-1, 1, n, dtype=F64)
    return [(s, diag * s) for s in (torch.randn(n, generator=gen, dtype=F64)
                                    for _ in range(count))]


def new_curvature(n: int, m: int, dtype: torch.dtype = F64) -> BlockCurvature:
    return BlockCurvature(numel=n, history_size=m, dtype=dtype, device=CPU)


# ---- two-loop vs dense BFGS ---------------------------------------------------------------
@pytest.mark.parametrize("offered", [1, 2, 5, 6, 13])
def test_two_loop_equals_dense_bfgs_recursion(offered: int) -> None:
    n, m = 12, 5
    curv = new_curvature(n, m)
    pairs = positive_pairs(offered, n, seed=offered)
    for s, y in pairs:
        assert curv.offer_pair(s.clone(), y.clone(), config=NO_DAMPING)
    kept = pairs[-m:]  # only the newest m count, oldest → newest
    g = torch.randn(n, generator=torch.Generator().manual_seed(99), dtype=F64)
    expected = dense_inverse_hessian([(s.numpy(), y.numpy()) for s, y in kept], n) @ g.numpy()

    q = g.clone()
    out = curv.apply_inverse_hessian_(q)
    assert out is q  # in place
    np.testing.assert_allclose(q.numpy(), expected, rtol=1e-10, atol=1e-12)
    looped = g.clone()
    assert curv.two_loop_(looped) is looped
    np.testing.assert_allclose(looped.numpy(), expected, rtol=1e-10, atol=1e-12)

    s_new, y_new = pairs[-1]
    assert float(curv.gamma) == pytest.approx(float(s_new @ y_new) / float(y_new @ y_new),
                                              rel=1e-14)
    assert int(curv.count) == min(offered, m)
    assert int(curv.head) == offered % m
    assert int(curv.accepted) == offered and int(curv.rejected) == 0
    # Ring layout: the newest pair sits just before head, the older ones before it.
    for age, (s, y) in enumerate(reversed(kept)):
        slot = (int(curv.head) - 1 - age) % m
        assert torch.equal(curv.S[slot], s) and torch.equal(curv.Y[slot], y)
        assert float(curv.rho[slot]) == pytest.approx(1.0 / float(s @ y), rel=1e-14)


def test_two_loop_is_symmetric_positive_definite_operator() -> None:
    """H built from positive-curvature pairs is SPD: H applied to the basis gives such a matrix."""
    n, m = 8, 4
    curv = new_curvature(n, m)
    for s, y in positive_pairs(7, n, seed=3):
        curv.offer_pair(s, y, config=NO_DAMPING)
    h = torch.stack([curv.apply_inverse_hessian_(e.clone()) for e in torch.eye(n, dtype=F64)])
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)
    assert float(torch.linalg.eigvalsh(h).min()) > 0


def test_state_tensors_round_trip_restores_ring_order() -> None:
    n, m = 6, 3
    src = new_curvature(n, m)
    for s, y in positive_pairs(5, n, seed=1):  # wrapped: head = 2
        src.offer_pair(s, y, config=NO_DAMPING)
    dst = new_curvature(n, m)
    assert not dst.has_curvature
    dst.load_state_tensors({k: v.clone() for k, v in src.state_tensors().items()})
    assert dst.has_curvature
    assert set(src.state_tensors()) == set(CURVATURE_STATE_KEYS)
    g = torch.randn(n, dtype=F64)
    assert torch.equal(src.apply_inverse_hessian_(g.clone()), dst.apply_inverse_hessian_(g.clone()))


def test_load_state_tensors_rejects_wrong_shape() -> None:
    curv = new_curvature(4, 3)
    state = {k: v.clone() for k, v in curv.state_tensors().items()}
    state["S"] = torch.zeros(2, 4, dtype=F64)
    with pytest.raises(ValueError, match="'S'"):
        curv.load_state_tensors(state)


@pytest.mark.parametrize(("kwargs", "name"), [
    ({"numel": 0, "history_size": 3}, "numel"),
    ({"numel": 4, "history_size": 0}, "history_size"),
])
def test_block_curvature_rejects_bad_sizes(kwargs: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        BlockCurvature(dtype=F64, device=CPU, **kwargs)


# ---- damping --------------------------------------------------------------------------------
@pytest.mark.parametrize(("mu", "tau0", "expected"), [
    (0.5, 0.8, 0.8),                          # inside [σL, σH]: τ0
    (0.01, 0.8, 0.8),                         # exactly σL is inside
    (1.5, 0.8, 0.8),                          # exactly σH is inside
    (-1.0, 0.8, 0.99 / 2.0),                  # below σL, bound binds: (1−σL)/(1−μ) = 0.495
    (0.005, 0.8, 0.8),                        # below σL, τ0 binds: 0.99/0.995 > 0.8
    (0.005, 1.0, 0.99 / 0.995),               # no damping: bound binds
    (3.0, 0.8, 0.25),                         # above σH, bound binds: (σH−1)/(μ−1) = 0.5/2
    (1.6, 0.8, 0.8),                          # above σH, τ0 binds: 0.5/0.6 > 0.8
    (1.6, 1.0, 0.5 / 0.6),                    # no damping: bound binds
    (0.7, 1.0, 1.0),                          # no damping inside: untouched
])
def test_damping_factor_hand_computed(mu: float, tau0: float, expected: float) -> None:
    tau = damping_factor(mu, tau0=tau0, sigma_low=0.01, sigma_high=1.5)
    assert tau == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("mu", [-3.0, -0.2, 0.0, 0.004, 1.51, 2.0, 40.0])
def test_binding_bound_puts_damped_ratio_on_the_bound(mu: float) -> None:
    """When the bound binds (τ < τ0), μ̂ = τμ + (1−τ) lands exactly on the violated bound."""
    cfg = MLBFGSConfig(damping=0.0, sigma_low=0.01, sigma_high=1.5)
    s = torch.tensor([1.0, 2.0, -2.0], dtype=F64)                     # sᵀs = 9
    y = mu * s
    pair = damp_pair_(s, y, config=cfg)
    assert pair.tau < 1.0
    bound = 0.01 if mu < 0.01 else 1.5
    assert pair.s_dot_yhat / pair.s_dot_s == pytest.approx(bound, rel=1e-12)
    assert float(s @ y) / 9.0 == pytest.approx(bound, rel=1e-12)   # y was overwritten with ŷ


def test_damp_pair_below_lower_bound_hand_computed() -> None:
    s = torch.tensor([1.0, 2.0], dtype=F64)                 # sᵀs = 5
    y = torch.tensor([-1.0, 0.5], dtype=F64)                # sᵀy = 0 → μ = 0 < σL
    pair = damp_pair_(s, y, config=MLBFGSConfig(damping=0.2))
    # τ = min((1 − 0.01)/(1 − 0), 0.8) = 0.8; ŷ = 0.8·y + 0.2·s = (−0.6, 0.8)
    assert pair.tau == pytest.approx(0.8)
    torch.testing.assert_close(y, torch.tensor([-0.6, 0.8], dtype=F64))
    assert (pair.s_dot_s, pair.s_dot_yhat, pair.yhat_dot_yhat) == pytest.approx((5.0, 1.0, 1.0))

    y = torch.tensor([-1.0, 0.5], dtype=F64)
    pair = damp_pair_(s, y, config=MLBFGSConfig(damping=0.0))
    # τ = 0.99; ŷ = (−0.98, 0.515); sᵀŷ = 0.05 = σL·sᵀs
    assert pair.tau == pytest.approx(0.99)
    torch.testing.assert_close(y, torch.tensor([-0.98, 0.515], dtype=F64))
    assert pair.s_dot_yhat == pytest.approx(0.05)


def test_damp_pair_above_upper_bound_hand_computed() -> None:
    s = torch.tensor([1.0, 0.0], dtype=F64)                 # sᵀs = 1
    y = torch.tensor([4.0, 3.0], dtype=F64)                 # μ = 4 > σH
    pair = damp_pair_(s, y, config=MLBFGSConfig(damping=0.2))
    # τ = min(0.5/3, 0.8) = 1/6; ŷ = (4/6 + 5/6, 3/6) = (1.5, 0.5)
    assert pair.tau == pytest.approx(1.0 / 6.0)
    torch.testing.assert_close(y, torch.tensor([1.5, 0.5], dtype=F64))
    assert (pair.s_dot_yhat, pair.yhat_dot_yhat) == pytest.approx((1.5, 2.5))


def test_damp_pair_between_bounds_hand_computed() -> None:
    s = torch.tensor([1.0, 0.0], dtype=F64)
    y = torch.tensor([0.5, 1.0], dtype=F64)                 # μ = 0.5, inside
    pair = damp_pair_(s, y, config=MLBFGSConfig(damping=0.2))
    assert pair.tau == pytest.approx(0.8)                   # τ0
    torch.testing.assert_close(y, torch.tensor([0.6, 0.8], dtype=F64))

    y = torch.tensor([0.5, 1.0], dtype=F64)
    y_before = y.clone()
    pair = damp_pair_(s, y, config=MLBFGSConfig(damping=0.0))
    assert pair.tau == 1.0
    assert torch.equal(y, y_before)                         # τ = 1 leaves y bit-identical


# ---- rejection ------------------------------------------------------------------------------
NAN, INF = math.nan, math.inf


# ---- double damping, first stage (Goldfarb, Ren & Bahamou 2020) -------------------------
@pytest.mark.parametrize(("s_dot_y", "y_h_y", "mu1", "expected"), [
    (0.0, 1.0, 0.2, 0.8),            # θ = (1 − μ1)·yHy / (yHy − sy)
    (-1.0, 3.0, 0.2, 0.6),           # 0.8·3 / 4
    (0.1, 1.0, 0.2, 0.8 / 0.9),
    (0.2, 1.0, 0.2, 1.0),            # on the bound: untouched
    (5.0, 1.0, 0.2, 1.0),            # above it
    (1.0, 0.0, 0.2, 1.0),            # yᵀHy = 0: nothing to bound
    (NAN, 1.0, 0.2, 1.0),
    (1.0, INF, 0.2, 1.0),
])
def test_inverse_damping_factor_hand_computed(s_dot_y: float, y_h_y: float, mu1: float,
                                              expected: float) -> None:
    assert inverse_damping_factor(s_dot_y, y_h_y, mu1=mu1) == pytest.approx(expected,
                                                                             rel=1e-15)


def test_double_damping_moves_s_towards_h_y_onto_the_bound() -> None:
    """A noisy pair (‖y‖ ≫, sᵀy ≈ 0) offered to a block with history: the stored s is
    θ·s + (1−θ)·H·y with H the dense inverse Hessian of the pairs stored *before* it, and
    sᵀy = μ1·yᵀHy afterwards; the design's damping of y then runs on the new s. A pair that
    meets the bound, and any pair offered to an empty ring, is stored as without it."""
    n, m, mu1 = 6, 5, 0.2
    cfg = MLBFGSConfig(damping=0.0, sigma_low=0.0, sigma_high=1e12, double_damping=mu1)
    previous = positive_pairs(3, n, seed=11)
    with_dd, without = new_curvature(n, m), new_curvature(n, m)
    for s, y in previous:
        assert with_dd.offer_pair(s.clone(), y.clone(), config=cfg)
        assert without.offer_pair(s.clone(), y.clone(), config=NO_DAMPING)
    assert torch.equal(with_dd.S, without.S)        # an empty ring: s untouched, first pair
    h_old = dense_inverse_hessian([(s.numpy(), y.numpy()) for s, y in previous], n)
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(n, generator=gen, dtype=F64)
    y = 20.0 * torch.randn(n, generator=gen, dtype=F64)
    y -= (float(s @ y) / float(s @ s) - 1e-3) * s        # sᵀy = 1e-3·sᵀs: tiny, positive
    h_y = torch.from_numpy(h_old @ y.numpy())
    assert float(s @ y) < mu1 * float(y @ h_y)
    theta = (1.0 - mu1) * float(y @ h_y) / (float(y @ h_y) - float(s @ y))
    assert with_dd.offer_pair(s.clone(), y.clone(), config=cfg)
    stored = with_dd.S[(int(with_dd.head) - 1) % m]
    torch.testing.assert_close(stored, theta * s + (1.0 - theta) * h_y, rtol=1e-10, atol=1e-12)
    assert float(stored @ y) == pytest.approx(mu1 * float(y @ h_y), rel=1e-10)
    assert with_dd.last_theta == pytest.approx(theta, rel=1e-12)
    # Already on the safe side of the bound (s = H·y: sᵀy = yᵀHy): stored as offered.
    y_ok = torch.randn(n, generator=gen, dtype=F64)
    s_ok = torch.from_numpy(h_old @ y_ok.numpy())
    assert without.offer_pair(s_ok.clone(), y_ok.clone(), config=NO_DAMPING)
    check = new_curvature(n, m)
    for s_prev, y_prev in previous:
        check.offer_pair(s_prev.clone(), y_prev.clone(), config=cfg)
    h_ok = torch.from_numpy(h_old @ y_ok.numpy())
    assert float(s_ok @ y_ok) >= mu1 * float(y_ok @ h_ok)
    assert check.offer_pair(s_ok.clone(), y_ok.clone(), config=cfg)
    assert torch.equal(check.S, without.S) and check.last_theta == 1.0


@pytest.mark.parametrize(("s", "y", "cfg"), [
    ([0.0, 0.0, 0.0], [1.0, 2.0, 3.0], MLBFGSConfig()),                    # s = 0
    ([1.0, 2.0, 3.0], [NAN, 1.0, 1.0], MLBFGSConfig()),                    # NaN in y
    ([1.0, INF, 3.0], [1.0, 1.0, 1.0], MLBFGSConfig()),                    # Inf in s
    ([1.0, 0.0, 3.0], [1.0, INF, 1.0], MLBFGSConfig()),                    # 0·Inf in sᵀy
    ([1.0, 2.0, 3.0], [1.0, -INF, 1.0], MLBFGSConfig()),                   # −Inf in y
    ([1.0, 0.0, 0.0], [0.25, 0.0, 0.0],                                    # sᵀŷ == ε sᵀs
     MLBFGSConfig(damping=0.0, curvature_eps=0.25)),
    ([1.0, 0.0, 0.0], [0.05, 7.0, 0.0],                                    # sᵀŷ < ε sᵀs
     MLBFGSConfig(damping=0.0, curvature_eps=0.1)),
    ([1.0, 1.0, 0.0], [0.0, 0.0, 5.0],                                     # sᵀy = 0, σL = 0
     MLBFGSConfig(damping=0.0, sigma_low=0.0)),
    ([1.0, 0.0, 0.0], [1e-9, 0.0, 0.0],                                    # μ = 1e-9 <= ε
     MLBFGSConfig(damping=0.0, sigma_low=0.0)),
    ([2.0, 0.0, 0.0], [-3.0, 1.0, 0.0],                                    # μ < 0 lifted to 0
     MLBFGSConfig(damping=0.0, sigma_low=0.0)),
])
def test_rejected_pairs_are_counted_and_never_stored(s: list[float], y: list[float],
                                                     cfg: MLBFGSConfig) -> None:
    # The design's acceptance test alone: double damping runs before it and moves s towards
    # H·y, which turns e.g. s = 0 into an acceptable pair (its own tests are above).
    cfg = dataclasses.replace(cfg, double_damping=0.0)
    n, m = 3, 2
    curv = new_curvature(n, m)
    s0, y0 = positive_pairs(1, n, seed=5)[0]
    assert curv.offer_pair(s0, y0, config=cfg)
    before = {k: v.clone() for k, v in curv.state_tensors().items()}
    g = torch.tensor([0.3, -1.0, 2.0], dtype=F64)
    d_before = curv.apply_inverse_hessian_(g.clone())

    accepted = curv.offer_pair(torch.tensor(s, dtype=F64), torch.tensor(y, dtype=F64), config=cfg)

    assert not accepted
    assert int(curv.rejected) == 1 and int(curv.accepted) == 1
    for key in ("S", "Y", "rho", "gamma", "head", "count"):
        assert torch.equal(curv.state_tensors()[key], before[key]), key
    assert torch.isfinite(curv.S).all() and torch.isfinite(curv.Y).all()
    assert torch.equal(curv.apply_inverse_hessian_(g.clone()), d_before)


def test_pair_whose_rho_float32_cannot_hold_is_rejected() -> None:
    """A dead network's pair: s = y ~ 1e-20 passes sᵀŷ > ε·sᵀs (μ = 1), but ρ = 1/sᵀŷ ≈ 1e40
    is beyond float32's range. Storing it raised ("value cannot be converted to type float
    without overflow") and took a training run down (CNN, lr 0.2, seed 2, step 550)."""
    curv = new_curvature(3, 2, dtype=torch.float32)
    tiny = torch.tensor([1e-20, 0.0, 0.0], dtype=torch.float32)
    assert not curv.offer_pair(tiny.clone(), tiny.clone(), config=MLBFGSConfig())
    assert (int(curv.count), int(curv.rejected)) == (0, 1)
    # The same pair scaled into range is accepted: only the overflow is refused.
    assert curv.offer_pair(tiny * 1e15, tiny * 1e15, config=MLBFGSConfig())
    assert math.isfinite(float(curv.rho[0])) and int(curv.count) == 1


def test_rejection_into_empty_ring_keeps_it_empty() -> None:
    curv = new_curvature(3, 2)
    assert not curv.offer_pair(torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64),
                               config=MLBFGSConfig())
    assert not curv.has_curvature
    assert (int(curv.count), int(curv.head), int(curv.rejected)) == (0, 0, 1)


# ---- allocation and vectorisation -----------------------------------------------------------
def _profile(fn: Callable[[torch.Tensor], torch.Tensor], q: torch.Tensor) -> tuple[int, int]:
    """(bytes allocated, number of ATen ops) of one call ``fn(q)``."""
    fn(q)  # warm any lazy initialisation
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(q)
    events = prof.events()
    return (sum(e.cpu_memory_usage for e in events if e.cpu_memory_usage > 0),
            sum(1 for e in events if e.name.startswith("aten::")))


@pytest.mark.parametrize("form", ["apply_inverse_hessian_", "two_loop_"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_h_times_q_allocates_nothing(dtype: torch.dtype, form: str) -> None:
    n, m = 2000, 6
    curv = new_curvature(n, m, dtype)
    for s, y in diagonal_pairs(9, n, seed=2):
        curv.offer_pair(s.to(dtype), y.to(dtype), config=NO_DAMPING)
    assert _profile(getattr(curv, form), torch.randn(n, dtype=dtype))[0] == 0


def test_work_depends_on_neither_block_size_nor_history_length() -> None:
    """Compact form: a fixed handful of whole-block kernels. Two-loop: linear in the pairs."""
    m = 6
    compact: dict[tuple[int, int], int] = {}
    loop: dict[tuple[int, int], int] = {}
    for n in (10, 100_000):
        for count in (1, 3, 6):
            curv = new_curvature(n, m)
            for s, y in diagonal_pairs(count, n, seed=count):
                curv.offer_pair(s, y, config=NO_DAMPING)
            q = torch.randn(n, dtype=F64)
            compact[(n, count)] = _profile(curv.apply_inverse_hessian_, q)[1]
            loop[(n, count)] = _profile(curv.two_loop_, q)[1]
    assert len(set(compact.values())) == 1, compact
    for count in (1, 3, 6):
        assert loop[(10, count)] == loop[(100_000, count)]        # independent of block size
    per_pair = loop[(10, 3)] - loop[(10, 1)]
    assert per_pair > 0 and loop[(10, 6)] - loop[(10, 3)] == 3 * per_pair // 2
    assert compact[(10, 6)] < loop[(10, 6)] / 4


# ---- compact form vs two-loop -----------------------------------------------------------------
@pytest.mark.parametrize("offered", [1, 4, 10, 11, 17])
def test_compact_form_equals_two_loop(offered: int) -> None:
    n, m = 3000, 10
    for dtype, rtol in ((F64, 1e-12), (torch.float32, 2e-5)):
        curv = new_curvature(n, m, dtype)
        for s, y in positive_pairs(offered, n, seed=offered) if n <= 200 else \
                diagonal_pairs(offered, n, seed=offered):
            assert curv.offer_pair(s.to(dtype), y.to(dtype), config=MLBFGSConfig())
        g = torch.randn(n, generator=torch.Generator().manual_seed(5), dtype=dtype)
        compact = curv.apply_inverse_hessian_(g.clone())
        looped = curv.two_loop_(g.clone())
        rel = float((compact.double() - looped.double()).norm() / looped.double().norm())
        assert rel < rtol, (dtype, rel)


def test_compact_matrix_zero_for_empty_slots_and_rejects_bad_order() -> None:
    n, m = 50, 4
    curv = new_curvature(n, m)
    for s, y in positive_pairs(2, n, seed=4):
        curv.offer_pair(s, y, config=NO_DAMPING)
    # Slots 0 and 1 hold pairs: W over 3 slots has zero rows/columns for slot 2.
    rows = 3
    w = compact_middle_matrix(curv.S[:rows] @ curv.Y[:rows].T, curv.Y[:rows] @ curv.Y[:rows].T,
                              curv.rho[:rows], [1, 0], float(curv.gamma))
    assert w.shape == (6, 6) and w.dtype == F64
    for empty in (2, 5):
        assert not w[empty].any() and not w[:, empty].any()
    torch.testing.assert_close(w, w.T)  # W is symmetric
    with pytest.raises(ValueError, match="order"):
        compact_middle_matrix(w[:3, :3], w[:3, :3], curv.rho[:3], [3], 1.0)
    with pytest.raises(ValueError, match="order"):
        compact_middle_matrix(w[:3, :3], w[:3, :3], curv.rho[:3], [], 1.0)
