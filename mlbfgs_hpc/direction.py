"""From ``H·g`` to the direction a step applies: the SGD fall-back, grafting or the KL guard.

Once some block has curvature (``totals.curved``), the step's rank-order totals decide, the
same on every rank::

    gᵀd not finite or <= 0      -> d = g everywhere (SGD fall-back, counted)
    clip="graft"                -> each curved block's H·g at the norm of its g
    clip="graft-global"         -> every block by ONE factor: ‖d‖ = ‖g‖ overall
    clip="kl"                   -> the whole d by ν = min(1, sqrt(κ / gᵀd))
    clip="none", or no curvature -> d = H·g as it is (= g for blocks without pairs)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .batched import BatchedCurvature
from .config import MLBFGSConfig
from .stepsize import BlockStats, StepTotals, global_graft_factor, kl_factor


@dataclass(frozen=True)
class SizedDirection:
    """What :func:`size_direction_` did.

    Attributes:
        nu: the KL factor applied to the whole direction (1 otherwise).
        applied_sq: ‖applied direction‖², for the step-scale diagnostic.
        fell_back: the direction was not a descent direction: the gradient was used.
    """

    nu: float
    applied_sq: float
    fell_back: bool


def size_direction_(*, batched: BatchedCurvature, totals: StepTotals, block_stats: BlockStats,
                    config: MLBFGSConfig, direction: torch.Tensor,
                    grad: torch.Tensor) -> SizedDirection:
    """Write the direction the step applies into ``direction`` (flat, owned slice), from the
    padded H·g in ``batched`` (after :meth:`~BatchedCurvature.precondition_`)."""
    if totals.curved and (not math.isfinite(totals.g_dot_d) or totals.g_dot_d <= 0.0):
        direction.copy_(grad)
        return SizedDirection(nu=1.0, applied_sq=totals.g_sq_sum, fell_back=True)
    nu = 1.0
    applied_sq = totals.d_sq_sum
    if totals.curved and config.clip == "graft":
        # Per-block grafting: each curved block's H·g rescaled to the norm of its g
        # (Agarwal et al. 2020); local to the owner, one multiply for all blocks.
        batched.graft_(block_stats.graft_scales)
        applied_sq = totals.g_sq_sum
    elif totals.curved and config.clip == "graft-global":
        # One factor for every block on every rank (from the rank-order totals, so
        # identical everywhere): ‖d‖ = ‖g‖ overall, the blocks keep H's relative
        # lengths. Blocks without pairs (d = g) are scaled with the rest.
        scale = global_graft_factor(g_sq=totals.g_sq_sum, d_sq=totals.d_sq_sum)
        batched.graft_(dict.fromkeys(range(len(batched.blocks)), scale))
        applied_sq = totals.g_sq_sum
    batched.write_direction_()
    if totals.curved and config.clip == "kl":
        nu = kl_factor(totals.g_dot_d, kl_clip=config.kl_clip)
        if nu < 1.0:
            direction.mul_(nu)
        applied_sq = nu * nu * totals.d_sq_sum
    return SizedDirection(nu=nu, applied_sq=applied_sq, fell_back=False)
