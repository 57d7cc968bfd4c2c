"""The line-searched mode's history over the whole vector (``GlobalCurvature``).

Oracles: the textbook two-loop recursion on the same pairs (``BlockCurvature.two_loop_``, with
one block holding the whole vector), the Gram matrices recomputed from the stored pairs, and
the same history split over "ranks" (column slices whose rows are summed here in rank order,
as the optimizer's allgather does).
"""

from __future__ import annotations

import math

import pytest
import torch

from mlbfgs_hpc.config import MLBFGSConfig
from mlbfgs_hpc.curvature import BlockCurvature
from mlbfgs_hpc.global_curvature import GlobalCurvature

F64 = torch.float64


def pairs(n: int, count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of a convex quadratic with spread-out curvature (y = A·s, A SPD)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    a = q @ torch.diag(torch.logspace(-1, 2, n, dtype=F64)) @ q.T
    out = []
    for _ in range(count):
        s = torch.randn(n, generator=gen, dtype=F64)
        out.append((s, a @ s))
    return out


def curvature_over(slices: list[slice], n: int, m: int, **kw: float) -> list[GlobalCurvature]:
    del n
    return [GlobalCurvature(numel=sl.stop - sl.start, history_size=m, dtype=F64,
                            device=torch.device("cpu"), curvature_eps=1e-8, **kw)
            for sl in slices]


def offer_all(parts: list[GlobalCurvature], slices: list[slice], s: torch.Tensor,
              y: torch.Tensor) -> list[bool]:
    """Offer (s, y) to every part, with the rank-ordered sum of their rows (the allgather)."""
    pieces = [(s[sl].clone(), y[sl].clone()) for sl in slices]
    rows = [part.pair_row(ps, py) for part, (ps, py) in zip(parts, pieces)]
    totals = [sum(col) for col in zip(*rows)]
    return [part.offer(ps, py, totals) for part, (ps, py) in zip(parts, pieces)]


def direction(parts: list[GlobalCurvature], slices: list[slice], g: torch.Tensor
              ) -> tuple[torch.Tensor, float]:
    rows = [part.projection_row(g[sl]) for part, sl in zip(parts, slices)]
    totals = [sum(col) for col in zip(*rows)]
    d = torch.zeros_like(g)
    parts_dot = [part.descent_direction_(g[sl], totals, d[sl])
                 for part, sl in zip(parts, slices)]
    assert len(set(parts_dot)) == 1   # every rank computes the same scalar
    return d, parts_dot[0] - float(parts[0].gamma) * float(g @ g)


@pytest.mark.parametrize("m,count", [(5, 3), (4, 9)])   # filling; wrapped around twice
@pytest.mark.parametrize("splits", [[0, 12], [0, 5, 12], [0, 0, 7, 12]])  # 1-3 ranks, one empty
def test_direction_is_minus_the_two_loop_on_the_same_pairs(m: int, count: int,
                                                           splits: list[int]) -> None:
    n = 12
    slices = [slice(a, b) for a, b in zip(splits, splits[1:])]
    parts = curvature_over(slices, n, m)
    reference = BlockCurvature(numel=n, history_size=m, dtype=F64, device=torch.device("cpu"))
    plain = MLBFGSConfig(damping=0.0, sigma_low=0.0, sigma_high=math.inf, double_damping=0.0)
    for s, y in pairs(n, count):
        assert all(offer_all(parts, slices, s, y))
        assert reference.offer_pair(s.clone(), y.clone(), config=plain)
    g = torch.linspace(-1.0, 2.0, n, dtype=F64)
    d, g_dot_d = direction(parts, slices, g)
    expected = reference.two_loop_(g.clone())
    torch.testing.assert_close(d, -expected, rtol=1e-10, atol=1e-12)
    assert g_dot_d == pytest.approx(float(g @ d), rel=1e-10)
    # The kept Gram matrices are the stored pairs' products, on every part.
    s_all = torch.cat([p.S for p in parts], dim=1)
    y_all = torch.cat([p.Y for p in parts], dim=1)
    order = list(parts[0].order)
    for part in parts:
        assert part.order == tuple(order)
        torch.testing.assert_close(part.gram_sy[order][:, order],
                                   (s_all @ y_all.T)[order][:, order], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(part.gram_yy[order][:, order],
                                   (y_all @ y_all.T)[order][:, order], rtol=1e-12, atol=1e-12)


def test_negative_curvature_is_rejected_and_a_window_damps_when_asked() -> None:
    n = 6
    whole = [slice(0, n)]
    s = torch.ones(n, dtype=F64)
    (plain,) = curvature_over(whole, n, 3)
    assert offer_all([plain], whole, s, -s) == [False]
    assert int(plain.rejected) == 1 and not plain.has_curvature
    # With the design's window [0.01, 1.5], a pair of curvature ratio 10 is pulled to 1.5.
    (windowed,) = curvature_over(whole, n, 3, sigma_low=0.01, sigma_high=1.5)
    assert offer_all([windowed], whole, s, 10.0 * s) == [True]
    ratio = float(windowed.gram_sy[0, 0]) / float(s @ s)
    assert ratio == pytest.approx(1.5, rel=1e-12)
    torch.testing.assert_close(windowed.Y[0], 1.5 * s)


def test_state_round_trip_rebuilds_the_same_direction() -> None:
    n, m = 10, 4
    slices = [slice(0, 4), slice(4, 10)]
    parts = curvature_over(slices, n, m)
    for s, y in pairs(n, 6, seed=3):
        offer_all(parts, slices, s, y)
    g = torch.arange(n, dtype=F64) - 4.0
    d_before, _ = direction(parts, slices, g)
    # A checkpoint: the global state once, each block's columns from its owner. Reloaded on
    # ONE rank this time (the columns of both blocks).
    global_state = {k: v.clone() for k, v in parts[0].global_state().items()}
    blocks = [(sl, part.block_state(slice(0, sl.stop - sl.start)))
              for part, sl in zip(parts, slices)]
    (single,) = curvature_over([slice(0, n)], n, m)
    single.load(global_state, blocks)
    d_after, _ = direction([single], [slice(0, n)], g)
    torch.testing.assert_close(d_after, d_before, rtol=1e-12, atol=1e-14)
    assert int(blocks[0][1]["count"]) == m
    torch.testing.assert_close(blocks[1][1]["rho"].double(),
                               1.0 / torch.diagonal(parts[0].gram_sy))
