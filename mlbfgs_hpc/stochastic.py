"""``MLBFGS.step()`` without a line search: mL-BFGS's stochastic step, after the step check.

Per step, on the rank's owned blocks (:class:`~mlbfgs_hpc.MLBFGS` has gathered the owned
gradient and parameters and decided who takes part)::

    g = grad + wd·θ; EMA buffers; at t = kT (from 2T) pairs  -> rings of the owned blocks
    H·g of every owned block at once (BatchedCurvature)      -> per block gᵀd, γ, gᵀg, dᵀd
    allgather(per-rank sums, ring counters)                  -> identical totals everywhere
    SGD fall-back / grafting / KL factor (mlbfgs_hpc.direction)
    outer momentum and lr per param group                    -> Allgatherv(update)
    θ ← θ − update (parameters taking part)

The line-searched mode's counterpart is :mod:`mlbfgs_hpc.searched`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .batched import BatchedCurvature, ChunkPlan, scalar_rows
from .curvature import BlockCurvature
from .direction import size_direction_
from .flatops import outer_momentum_, update_emas_, weight_decay_
from .pairs import PairFormer
from .participation import StepParticipation
from .stepsize import DIAGNOSTIC_KEYS, BlockStats, StepTotals


class StochasticSteps:
    """The block-diagonal curvature of a rank's owned blocks and the step that uses it.

    Built by :meth:`for_optimizer` on an :class:`~mlbfgs_hpc.MLBFGS`'s flat buffers (the
    optimizer's own collaborator: it reads the optimizer's private layout).

    Args:
        optimizer: the optimizer (its layout is built).
        max_block_numel: the largest owned block (the pair scratch's size).
    """

    def __init__(self, optimizer: Any, *, max_block_numel: int) -> None:
        o = self.optimizer = optimizer
        # One history for all owned blocks; each block's ring is a BlockCurvature over its
        # columns (pairs, W, checkpoints), H·g runs batched over all of them.
        self.batched = BatchedCurvature(
            grad=o._grad, direction=o._direction,
            block_numels=[o.blocks[b].numel for b in o.owned_blocks],
            history_size=o.config.history_size,
            plan=ChunkPlan.for_model([block.numel for block in o.blocks], device=o._device))
        self.curvature: dict[int, BlockCurvature] = dict(zip(o.owned_blocks,
                                                             self.batched.blocks))
        self.pairs = PairFormer(block_slices=o._block_slices, curvature=self.curvature,
                                config=o.config, numel=o._owned_numel,
                                max_block_numel=max_block_numel, dtype=o._dtype,
                                device=o._device)
        #: What the curvature did in the last step (MLBFGS.diagnostics).
        self.diagnostics = dict.fromkeys(DIAGNOSTIC_KEYS, math.nan)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        return [*self.pairs.tensors(), *self.batched.tensors()]

    def step(self, taking_part: StepParticipation) -> None:
        """The step after the check (see the module docstring)."""
        o, cfg, counters = self.optimizer, self.optimizer.config, self.optimizer._global
        state, groups = o._flat_state, o.param_groups
        counters["step"] += 1
        t = int(counters["step"])
        weight_decay_(o._grad, o._param, o._segments,
                      [group["weight_decay"] for group in groups], held=taking_part.held)
        update_emas_(state, param=o._param, grad=o._grad, beta_param=cfg.beta_param,
                     beta_grad=cfg.beta_grad, first=t == 1, held=taking_part.held,
                     starting=taking_part.starting)
        o._participation.commit(taking_part)
        if t % cfg.update_freq == 0:
            if t >= 2 * cfg.update_freq:
                self.pairs.form_(state, first=t == 2 * cfg.update_freq, maybe_still={
                    o.owned_blocks[k] for k in o._participation.lagging_blocks(t)})
                self.batched.refresh()
            state["snap_param"].copy_(state["m_param"])
            state["snap_grad"].copy_(state["m_grad"])

        # H·g for every owned block at once, and per block gᵀd, γ, gᵀg, dᵀd, read back by
        # ONE transfer (on a GPU a float() per block would be a synchronisation each).
        batched = self.batched
        rows = scalar_rows(batched.precondition_(zero=taking_part.held).tolist())
        curved_slots = batched.curved
        block_stats = BlockStats.from_rows(rows, curved_slots)
        counts = batched.ring_totals   # summed over the blocks when their rings changed
        local = block_stats.to_row(
            accepted=counts.accepted, rejected=counts.rejected, curved=len(curved_slots),
            tau_sum=counts.tau_sum, tau_count=counts.tau_count)
        totals = StepTotals.from_rank_rows(o.comm.allgather_scalars(local))
        counters["accepted_pairs"].fill_(totals.accepted)
        counters["rejected_pairs"].fill_(totals.rejected)
        if totals.curved:
            counters["last_gamma"].fill_(totals.gamma_sum / totals.curved)

        # The guard acts only once curvature is in use (DESIGN.md §1.7); then the SGD
        # fall-back, grafting or the KL factor size what is applied (mlbfgs_hpc.direction).
        sized = size_direction_(batched=batched, totals=totals, block_stats=block_stats,
                                config=cfg, direction=o._direction, grad=o._grad)
        if sized.fell_back:
            counters["sgd_fallbacks"] += 1
        counters["last_nu"].fill_(sized.nu)
        self.diagnostics = totals.diagnostics(applied_sq=sized.applied_sq)

        # Heavy-ball momentum and the update lr·step vector, with each param group's μ and
        # lr as they are at this step, so a scheduler may change both.
        outer_momentum_(state["momentum_buffer"], o._direction, o._owned_update, o._segments,
                        momenta=[group["momentum"] for group in groups],
                        lrs=[group["lr"] for group in groups], nesterov=cfg.nesterov,
                        first=t == 1, held=taking_part.held)
        o.comm.allgatherv_(o._update, o.ownership.counts, o.ownership.offsets,
                           node_aware=o.node_aware)
        params = taking_part.moving(o._layout_params)   # idle ones are not touched
        if params:
            torch._foreach_sub_(params, taking_part.moving(o._update_views))
