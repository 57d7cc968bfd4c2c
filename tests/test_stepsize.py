"""Step sizing and diagnostics (mlbfgs_hpc/stepsize.py): hand-computed small cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlbfgs_hpc.stepsize import (BlockStats, StepTotals, global_graft_factor, kl_factor,
                                 sum_in_rank_order)


def _rows() -> dict[str, list[float]]:
    # Block 0: no curvature (d = g, ‖g‖² = 4). Block 1: curved, g = (1, 0), d = (1, 1).
    # Block 2: curved, H·g = 0 (d = 0): no graft scale, not measured.
    return {"g_dot_d": [4.0, 1.0, 0.0], "gamma": [0.0, 0.5, 0.25],
            "g_sq": [0.0, 1.0, 9.0], "d_sq": [0.0, 2.0, 0.0]}


def test_block_stats_by_hand() -> None:
    stats = BlockStats.from_rows(_rows(), curved=[1, 2])
    assert stats.g_dot_d == 5.0
    assert stats.g_sq_sum == 4.0 + 1.0 + 9.0 and stats.d_sq_sum == 4.0 + 2.0 + 0.0
    assert stats.gamma_sum == 0.75
    assert stats.measured == 1
    assert stats.cos_sum == pytest.approx(1.0 / math.sqrt(2.0))
    assert stats.cos_min == pytest.approx(1.0 / math.sqrt(2.0))
    assert stats.log_ratio_sum == pytest.approx(0.5 * math.log(2.0))
    assert stats.ratio_min == stats.ratio_max == pytest.approx(math.sqrt(2.0))
    assert set(stats.graft_scales) == {1, 2}          # only curved blocks are grafted
    assert stats.graft_scales[1] == pytest.approx(math.sqrt(0.5))
    assert math.isnan(stats.graft_scales[2])          # H·g = 0: the optimizer takes g


def test_step_totals_sum_ranks_and_take_the_minimum_cosine() -> None:
    one = BlockStats.from_rows(_rows(), curved=[1, 2])
    other = BlockStats.from_rows({"g_dot_d": [-1.0], "gamma": [2.0], "g_sq": [1.0],
                                  "d_sq": [4.0]}, curved=[0])
    per_rank = np.array([one.to_row(accepted=3, rejected=1, curved=2, tau_sum=1.6,
                                    tau_count=2),
                         other.to_row(accepted=1, rejected=0, curved=1, tau_sum=0.5,
                                      tau_count=1)])
    totals = StepTotals.from_rank_rows(per_rank)
    assert (totals.accepted, totals.rejected, totals.curved, totals.measured) == (4, 1, 3, 2)
    assert totals.g_dot_d == 4.0 and totals.g_sq_sum == 15.0 and totals.d_sq_sum == 10.0
    assert totals.cos_min == pytest.approx(-0.5)      # block with g = −H·g / 2: cos = −1/2
    diag = totals.diagnostics(applied_sq=15.0)
    # ‖H·g‖/‖g‖ of the two measured blocks, one per rank: √2 and 2.
    assert diag["hg_ratio_min"] == pytest.approx(math.sqrt(2.0))
    assert diag["hg_ratio_max"] == pytest.approx(2.0)
    assert diag["cos_mean"] == pytest.approx((1.0 / math.sqrt(2.0) - 0.5) / 2)
    assert diag["hg_ratio"] == pytest.approx(math.exp((0.5 * math.log(2.0) + math.log(2.0)) / 2))
    assert diag["step_scale"] == pytest.approx(1.0)   # grafted: ‖d‖ = ‖g‖
    assert diag["tau_mean"] == pytest.approx(0.7)


def test_diagnostics_are_nan_before_any_curvature() -> None:
    stats = BlockStats.from_rows({"g_dot_d": [2.0], "gamma": [0.0], "g_sq": [0.0],
                                  "d_sq": [0.0]}, curved=[])
    totals = StepTotals.from_rank_rows(np.array([stats.to_row(
        accepted=0, rejected=0, curved=0, tau_sum=0.0, tau_count=0)]))
    diag = totals.diagnostics(applied_sq=totals.d_sq_sum)
    assert all(math.isnan(diag[k]) for k in ("cos_mean", "cos_min", "hg_ratio", "hg_ratio_min",
                                             "hg_ratio_max", "tau_mean"))
    assert diag["step_scale"] == 1.0


def test_global_graft_factor_uses_the_sums_over_every_block() -> None:
    # The totals of _rows(): Σgᵀg = 14 (uncurved block 0 counts with d = g), Σdᵀd = 6.
    stats = BlockStats.from_rows(_rows(), curved=[1, 2])
    factor = global_graft_factor(g_sq=stats.g_sq_sum, d_sq=stats.d_sq_sum)
    assert factor == pytest.approx(math.sqrt(14.0 / 6.0))
    assert factor * factor * stats.d_sq_sum == pytest.approx(stats.g_sq_sum)
    assert math.isnan(global_graft_factor(g_sq=1.0, d_sq=0.0))   # caller keeps the gradient


def test_kl_factor_and_rank_order_sum() -> None:
    assert kl_factor(0.001, kl_clip=0.005) == 1.0
    assert kl_factor(0.02, kl_clip=0.005) == pytest.approx(0.5)
    # Rank order, not numpy's pairwise order: 1e16 + 1 − 1e16 is 0 in this order.
    assert sum_in_rank_order(np.array([[1e16], [1.0], [-1e16]])) == [0.0]


def test_overflowed_norms_are_not_measured_and_do_not_raise() -> None:
    """A diverging run: gᵀg (or dᵀd) summed in float32 overflows to inf while every entry is
    still finite. Measured on a CNN at lr 0.2, batch 512: ``log(dᵀd / gᵀg)`` raised and took
    the trainer down. The block is left out of the cosine and ratio diagnostics, and its graft
    scale is not finite and positive, so the optimizer gives it its gradient."""
    rows = {"g_dot_d": [1.0, 3.0, 2.0], "gamma": [0.5, 0.5, 0.5],
            "g_sq": [math.inf, 4.0, 1.0], "d_sq": [4.0, math.inf, 4.0]}
    stats = BlockStats.from_rows(rows, curved=[0, 1, 2])
    assert stats.measured == 1                          # only block 2
    assert stats.cos_min == pytest.approx(1.0)          # gᵀd = 2 = ‖g‖·‖d‖
    assert stats.log_ratio_sum == pytest.approx(0.5 * math.log(4.0))
    assert stats.ratio_min == stats.ratio_max == pytest.approx(2.0)
    assert math.isinf(stats.graft_scales[0]) and stats.graft_scales[1] == 0.0
