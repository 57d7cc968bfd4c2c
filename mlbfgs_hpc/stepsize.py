"""How long a step is, and what the curvature did: per-block scalars → step scale, diagnostics.

Pure functions of a handful of floats per block, so every rank (and every world size) sizes
the step identically and the rules are unit-testable without an optimizer::

    per owned block k:  gᵀd, γ, gᵀg, dᵀd        (one device → host read per step)
         │  BlockStats.from_rows (this rank, block order)
         ▼
    allgather of the rank sums  ──►  sum_in_rank_order  ──►  identical totals everywhere
         │
         ├─ clip="graft": block k's d rescaled by sqrt(gᵀg / dᵀd)   (local to its owner)
         ├─ clip="graft-global": every d by sqrt(Σgᵀg / Σdᵀd)      (the totals: all ranks)
         ├─ clip="kl":    the whole d scaled by ν = min(1, sqrt(κ / gᵀd))
         └─ diagnostics:  cos(H·g, g), ‖H·g‖/‖g‖, applied ‖d‖/‖g‖, damping τ
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Per-block scalars of one step, one row each of the optimizer's read-back matrix.
BLOCK_SCALARS: tuple[str, ...] = ("g_dot_d", "gamma", "g_sq", "d_sq")
#: Per-step read-outs of what the curvature did (:attr:`MLBFGS.diagnostics`), NaN before the
#: first pair. ``cos_mean``/``cos_min``: cosine between a block's H·g and its g (1: the
#: curvature does not bend the direction); ``hg_ratio``: geometric mean of ‖H·g‖/‖g‖ (the
#: curvature's own step length, before the guard); ``hg_ratio_min``/``hg_ratio_max``: its
#: smallest and largest value over the blocks (how differently H sizes them: under
#: ``clip="graft-global"`` the applied per-block lengths keep these proportions, under
#: per-block grafting every block gets 1); ``step_scale``: ‖applied direction‖/‖g‖ over all
#: blocks (after the guard or grafting); ``tau_mean``: mean damping factor τ of the blocks'
#: last offered pairs (τ0 = 1 − damping: undamped beyond τ0).
DIAGNOSTIC_KEYS: tuple[str, ...] = ("cos_mean", "cos_min", "hg_ratio", "hg_ratio_min",
                                    "hg_ratio_max", "step_scale", "tau_mean")


@dataclass(frozen=True)
class BlockStats:
    """One rank's per-block scalars of one step, summed in block order (as Python floats,
    so every rank and every world size adds them identically).

    ``graft_scales[k]``: sqrt(gᵀg / dᵀd) of curved block ``k`` (NaN when dᵀd = 0), the factor
    that gives its direction the gradient's norm.
    """

    g_dot_d: float
    gamma_sum: float
    g_sq_sum: float
    d_sq_sum: float
    cos_sum: float
    cos_min: float
    log_ratio_sum: float
    measured: int   # curved blocks with ‖g‖, ‖H·g‖ > 0: those in cos_* and the ratios
    graft_scales: dict[int, float]
    ratio_min: float   # smallest ‖H·g‖/‖g‖ over the measured blocks (inf: none)
    ratio_max: float   # largest (0: none)

    @classmethod
    def from_rows(cls, rows: dict[str, list[float]], curved: list[int]) -> BlockStats:
        """``rows``: :data:`BLOCK_SCALARS` → one value per owned block; ``curved``: the
        blocks with curvature (the others have d = g, so their norms are gᵀd)."""
        g_dot_d = gamma_sum = g_sq_sum = d_sq_sum = cos_sum = log_ratio_sum = 0.0
        cos_min, measured = math.inf, 0
        ratio_min, ratio_max = math.inf, 0.0
        scales: dict[int, float] = {}
        curved_set = set(curved)
        for k, gd in enumerate(rows["g_dot_d"]):
            g_dot_d += gd
            if k not in curved_set:
                g_sq_sum += gd
                d_sq_sum += gd
                continue
            g_sq, d_sq = rows["g_sq"][k], rows["d_sq"][k]
            gamma_sum += rows["gamma"][k]
            g_sq_sum += g_sq
            d_sq_sum += d_sq
            scales[k] = math.sqrt(g_sq / d_sq) if d_sq > 0.0 else math.nan
            # Only finite, positive norms whose ratio is representable are measured: in a run
            # that is diverging, gᵀg or dᵀd can overflow float32 (inf) while every entry is
            # still finite, and log(dᵀd / inf) would raise instead of reporting.
            ratio = d_sq / g_sq if g_sq > 0.0 and d_sq > 0.0 else 0.0
            if 0.0 < ratio < math.inf and math.isfinite(gd):
                cos = gd / (math.sqrt(g_sq) * math.sqrt(d_sq))
                cos_sum += cos
                cos_min = min(cos_min, cos)
                log_ratio_sum += 0.5 * math.log(ratio)
                length = math.sqrt(ratio)
                ratio_min, ratio_max = min(ratio_min, length), max(ratio_max, length)
                measured += 1
        return cls(g_dot_d=g_dot_d, gamma_sum=gamma_sum, g_sq_sum=g_sq_sum,
                   d_sq_sum=d_sq_sum, cos_sum=cos_sum, cos_min=cos_min,
                   log_ratio_sum=log_ratio_sum, measured=measured, graft_scales=scales,
                   ratio_min=ratio_min, ratio_max=ratio_max)

    def to_row(self, *, accepted: int, rejected: int, curved: int, tau_sum: float,
               tau_count: int) -> list[float]:
        """This rank's row of the per-step allgather (see :class:`StepTotals`)."""
        return [self.g_dot_d, curved, self.gamma_sum, accepted, rejected, self.cos_sum,
                self.log_ratio_sum, self.g_sq_sum, self.d_sq_sum, tau_sum, tau_count,
                self.measured, self.cos_min, self.ratio_min, self.ratio_max]


@dataclass(frozen=True)
class StepTotals:
    """The rows of :meth:`BlockStats.to_row` from every rank, summed in rank order (the last
    three columns, ``cos_min``, ``ratio_min`` and ``ratio_max``, are a minimum, a minimum and
    a maximum): identical on every rank."""

    g_dot_d: float
    curved: int
    gamma_sum: float
    accepted: int
    rejected: int
    cos_sum: float
    log_ratio_sum: float
    g_sq_sum: float
    d_sq_sum: float
    tau_sum: float
    tau_count: int
    measured: int
    cos_min: float
    ratio_min: float
    ratio_max: float

    @classmethod
    def from_rank_rows(cls, per_rank: Any) -> StepTotals:
        """``per_rank``: the (ranks × values) array of the allgather."""
        totals = sum_in_rank_order(per_rank[:, :-3])
        cos_mins, ratio_mins, ratio_maxs = ([float(v) for v in per_rank[:, j]]
                                            for j in (-3, -2, -1))
        return cls(g_dot_d=totals[0], curved=int(totals[1]), gamma_sum=totals[2],
                   accepted=int(totals[3]), rejected=int(totals[4]), cos_sum=totals[5],
                   log_ratio_sum=totals[6], g_sq_sum=totals[7], d_sq_sum=totals[8],
                   tau_sum=totals[9], tau_count=int(totals[10]), measured=int(totals[11]),
                   cos_min=min(cos_mins, default=math.inf),
                   ratio_min=min(ratio_mins, default=math.inf),
                   ratio_max=max(ratio_maxs, default=0.0))

    def diagnostics(self, *, applied_sq: float) -> dict[str, float]:
        """:data:`DIAGNOSTIC_KEYS` of this step; ``applied_sq``: ‖applied direction‖²."""
        measured = self.measured
        return {
            "cos_mean": self.cos_sum / measured if measured else math.nan,
            "cos_min": self.cos_min if measured else math.nan,
            "hg_ratio": math.exp(self.log_ratio_sum / measured) if measured else math.nan,
            "hg_ratio_min": self.ratio_min if measured else math.nan,
            "hg_ratio_max": self.ratio_max if measured else math.nan,
            "step_scale": (math.sqrt(applied_sq / self.g_sq_sum) if self.g_sq_sum > 0.0
                           else math.nan),
            "tau_mean": self.tau_sum / self.tau_count if self.tau_count else math.nan,
        }


def global_graft_factor(*, g_sq: float, d_sq: float) -> float:
    """sqrt(Σ gᵀg / Σ dᵀd) over every block: the one factor that gives the whole direction
    the whole gradient's norm (NaN when dᵀd = 0; the caller then keeps the gradient)."""
    return math.sqrt(g_sq / d_sq) if d_sq > 0.0 else math.nan


def kl_factor(g_dot_d: float, *, kl_clip: float) -> float:
    """ν = min(1, sqrt(κ / gᵀd)) of the design's KL guard (gᵀd > 0)."""
    return min(1.0, math.sqrt(kl_clip / g_dot_d))


def sum_in_rank_order(per_rank: Any) -> list[float]:
    """Column sums of a (ranks × values) array, added in rank order on every rank.

    One float64 vector addition per rank (elementwise, so every column is the same sequence
    of IEEE additions as a Python loop over the ranks: 0 + r₀ + r₁ + …, on every rank and
    every machine)."""
    rows = np.asarray(per_rank, dtype=np.float64)
    totals = np.zeros(rows.shape[1], dtype=np.float64)
    for row in rows:
        totals += row
    return totals.tolist()
