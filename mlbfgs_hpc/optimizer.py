"""mL-BFGS as a ``torch.optim.Optimizer``, block-diagonal and split across MPI ranks.

Layout on p ranks (ownership from :mod:`mlbfgs_hpc.partition`)::

    flat vector:  | block 0 | block 1 | block 2 | block 3 | block 4 |
    owner:        |  rank 0           | rank 1  |  rank 2           |
    per rank:      m_param, m_grad, snapshots, outer momentum  -> flat over the owned slice
                   S, Ŷ of all owned blocks: one (2m, n_pad)  -> BatchedCurvature
                   ring head/count, ρ, γ, W per owned block    -> BlockCurvature (views)
    every rank:    the full update vector (Allgatherv target), applied to all parameters

Step on every rank (DESIGN.md §1–§2)::

    gradients reduce-scattered to their owners    -> owned gradient/params into flat buffers
      (GradientReducer; or allreduced)
    allgather(non-finite flag)                    -> skip the step everywhere if any rank saw one
    g = grad + wd·θ; EMA buffers; pairs at t = kT -> H·g (compact form), all owned blocks
                                                     in a fixed number of kernels
    allgather(gᵀd, #curved blocks, counters)      -> identical guard ν on every rank
    outer momentum and lr per param group         -> Allgatherv(update)   -> θ ← θ − update
                                                     (flat, or node-aware: one copy per host
                                                      crosses the network; mlbfgs_hpc.comm)

With one process the communicator is local and every collective is the identity.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .batched import BatchedCurvature, ChunkPlan, scalar_rows
from .blocks import ParamBlock, blocks_from_parameters, check_blocks_cover
from .comm import (GRAD_BACKENDS, GRAD_REDUCE_MODES, GradBackend, GradientReducer, GradReduce,
                   LocalCommunicator, tensor_digest)
from .config import DEFAULT_MOMENTUM, MLBFGSConfig, validate_group_hyperparameters
from .curvature import BlockCurvature
from .flatops import clip_factor, gradient_row, heavy_ball_
from .layout import build_local_layout
from .optimizer_state import (FLAT_STATE_KEYS, GLOBAL_STATE_KEYS, check_saved_state,
                              load_group_settings, pack_state)
from .pairs import PairFormer
from .partition import Ownership
from .stepsize import (DIAGNOSTIC_KEYS, BlockStats, StepTotals, global_graft_factor, kl_factor,
                       sum_in_rank_order)

logger = logging.getLogger(__name__)


class MLBFGS(torch.optim.Optimizer):
    """Momentum-based stochastic L-BFGS (Niu et al., TMLR 2023), block-wise and distributed.

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Groups may set
            their own ``lr``, ``weight_decay`` and ``momentum`` (schedulers may change them
            between steps, e.g. ``OneCycleLR``'s momentum cycling).
        blocks: the blocks of the block-diagonal Hessian, e.g. ``build_blocks(model)``; they
            must cover exactly the optimized parameters. ``None``: one block per parameter
            tensor.
        lr: learning rate (default for groups that do not set one).
        weight_decay: coupled weight decay, ``g = grad + wd·θ`` (per-group default).
        history_size: curvature pairs kept per block (m).
        update_freq: snapshot period T in steps; the first pair forms at step 2T.
        beta_param: EMA factor of the parameter momentum buffer.
        beta_grad: EMA factor of the gradient momentum buffer.
        damping: 1 − τ0 of the pair damping (0 disables it inside [σL, σH]).
        sigma_low: lower bound of the curvature ratio sᵀy/sᵀs.
        sigma_high: upper bound of the curvature ratio.
        curvature_eps: acceptance threshold ε of sᵀŷ > ε·sᵀs.
        clip: how the step is sized once a block has curvature: ``"graft"`` (per block,
            H·g at the norm of g), ``"graft-global"`` (the whole direction at the norm of
            the whole g, one factor), ``"kl"`` (ν = min(1, sqrt(κ/gᵀd))) or ``"none"``.
        kl_clip: κ of the ``"kl"`` guard.
        momentum: outer heavy-ball momentum (per-group default, as ``torch.optim.SGD``'s).
        nesterov: Nesterov variant of the outer momentum (needs every group's momentum > 0).
        pair_momentum: EMA over successive pairs ("double momentum"); 0: off. See
            :class:`~mlbfgs_hpc.config.MLBFGSConfig`.
        double_damping: μ1 of double damping's first stage (s moved towards H·y so that
            sᵀy ≥ μ1·yᵀHy; Goldfarb et al. 2020); 0: off. Default 0.2; see the config.
        max_grad_norm: clip the averaged gradient to this global norm (all blocks, all
            ranks; before weight decay, as ``clip_grad_norm_`` before a torch step), in
            every ``grad_reduce`` mode; ``None``: off. See :attr:`last_grad_norm`.
        comm: communicator from :func:`~mlbfgs_hpc.comm.init_communicator`; ``None`` for a
            single process.
        grad_backend: how gradients are averaged across ranks (ignored on one rank):
            ``"auto"`` (the default: Horovod where it imports on every rank, ``mpi4py``
            otherwise; logged once), ``"horovod"`` or ``"mpi"``. ``None`` leaves the
            gradients alone (the caller averages).
        grad_reduce: ``"allreduce"`` (every rank receives the whole average in ``.grad``;
            the default: it overlaps the backward pass and measured faster, BENCHMARKS.md)
            or ``"reducescatter"`` (each rank receives only the average of the blocks it
            owns: half the bytes of an allreduce, ``.grad`` is left unaveraged); see
            :class:`~mlbfgs_hpc.comm.GradientReducer`.
        node_aware: combine inside each host over shared memory first, so one copy per host
            crosses the network, for the reduce-scatter and the update ``Allgatherv``.
            ``None``: automatically, when more than one host runs and some host runs more
            than one rank. The update is bit for bit the flat path's.
        grad_overlap: Horovod reduce-scatter: send each owner's gradient slice from the
            backward hook that completes it (default) or after the backward pass.
        param_names: names of the parameters for the Horovod collectives and checkpoints
            (taken from ``blocks`` when they carry names).

    Raises:
        ValueError: a hyper-parameter is out of range, blocks and params disagree, or the
            parameters mix dtypes or devices.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        blocks: Sequence[ParamBlock] | None = None,
        lr: float = 0.1,
        weight_decay: float = 0.0,
        history_size: int = 10,
        update_freq: int = 50,
        beta_param: float = 0.9,
        beta_grad: float = 0.9,
        damping: float = 0.2,
        sigma_low: float = 0.01,
        sigma_high: float = 1.5,
        curvature_eps: float = 1e-8,
        clip: str = "graft",
        kl_clip: float = 0.005,
        momentum: float = DEFAULT_MOMENTUM,
        nesterov: bool = False,
        pair_momentum: float = 0.0,
        double_damping: float = 0.2,
        max_grad_norm: float | None = None,
        comm: LocalCommunicator | None = None,
        grad_backend: GradBackend | None = "auto",
        grad_reduce: GradReduce = "allreduce",
        node_aware: bool | None = None,
        grad_overlap: bool = True,
    ) -> None:
        self.config = MLBFGSConfig(
            history_size=history_size, update_freq=update_freq, beta_param=beta_param,
            beta_grad=beta_grad, damping=damping, sigma_low=sigma_low, sigma_high=sigma_high,
            curvature_eps=curvature_eps, clip=clip, kl_clip=kl_clip,  # type: ignore[arg-type]
            nesterov=nesterov, pair_momentum=pair_momentum, double_damping=double_damping,
            max_grad_norm=max_grad_norm)
        if grad_backend is not None and grad_backend not in GRAD_BACKENDS:
            raise ValueError(
                f"grad_backend must be one of {GRAD_BACKENDS} or None, got {grad_backend!r}")
        if grad_reduce not in GRAD_REDUCE_MODES:
            raise ValueError(
                f"grad_reduce must be one of {GRAD_REDUCE_MODES}, got {grad_reduce!r}")
        self._constructing = True
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})
        self._constructing = False
        self.comm = comm if comm is not None else LocalCommunicator()

        # Frozen parameters (requires_grad=False) may sit in the groups, as with any torch
        # optimizer (``model.parameters()``), but are never part of a block and never move.
        group_params = [p for group in self.param_groups for p in group["params"]
                        if p.requires_grad]
        self.blocks = list(blocks) if blocks is not None else blocks_from_parameters(group_params)
        check_blocks_cover(self.blocks, group_params)
        self._layout_params = [p for block in self.blocks for p in block.params]
        self.param_names = [n for block in self.blocks for n in block.param_names]
        first = self._layout_params[0]
        self._dtype, self._device = first.dtype, first.device

        self.ownership = Ownership.build(block_numels=[b.numel for b in self.blocks],
                                         world_size=self.comm.size)
        self._build_local_layout()
        self._reducer = (None if grad_backend is None else GradientReducer(
            comm=self.comm, named_params=list(zip(self.param_names, self._layout_params)),
            backend=grad_backend, mode=grad_reduce, ownership=self.ownership,
            node_aware=node_aware, overlap=grad_overlap))
        #: The backend taken (``"auto"`` resolved on more than one rank), or ``None``.
        self.grad_backend = grad_backend if self._reducer is None else self._reducer.backend
        self.grad_reduce = grad_reduce
        self.node_aware = self.comm.resolve_node_aware(node_aware)
        # Any backward pass makes new gradients: synchronize() must wait for them again, even
        # when no step() came in between (a GradScaler that skipped an overflowed step).
        # (A weak reference: the hooks live as long as the parameters and must not keep a
        # discarded optimizer alive.)
        changed = weakref.WeakMethod(self._gradients_changed)

        def hook(param: torch.Tensor) -> None:
            method = changed()
            if method is not None:
                method(param)

        for param in self._layout_params:
            param.register_post_accumulate_grad_hook(hook)
        logger.debug("rank %d owns blocks %s (%d of %d parameters)", self.comm.rank,
                     self.owned_blocks, self._owned_numel, self.ownership.total_numel)

    # ---- construction helpers ----------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not getattr(self, "_constructing", False):
            raise RuntimeError("MLBFGS fixes its blocks at construction: add every param "
                               "group to the constructor instead of add_param_group()")
        # Every group, the constructor's own params included, comes through here with the
        # defaults filled in: the one place the per-group values (and the defaults) are checked.
        values = {**self.defaults, **param_group}
        validate_group_hyperparameters(lr=values["lr"], weight_decay=values["weight_decay"],
                                       momentum=values["momentum"],
                                       nesterov=self.config.nesterov)
        super().add_param_group(param_group)

    def _build_local_layout(self) -> None:
        own = self.ownership
        rank = self.comm.rank
        self.owned_blocks = own.blocks_of(rank)
        self._owned_offset = own.offsets[rank]
        self._owned_numel = own.counts[rank]
        kw = {"dtype": self._dtype, "device": self._device}
        n = self._owned_numel
        # Flat per-rank buffers over the owned slice: elementwise work is one op per step.
        self._grad = torch.zeros(n, **kw)
        self._param = torch.zeros(n, **kw)
        self._direction = torch.zeros(n, **kw)
        self._flat_state = {key: torch.zeros(n, **kw) for key in FLAT_STATE_KEYS}
        # The full update vector; this rank writes its slice, Allgatherv fills the rest.
        self._update = torch.zeros(own.total_numel, **kw)
        self._owned_update = self._update.narrow(0, self._owned_offset, n)
        self._update_views = [v.view_as(p) for v, p in zip(
            self._update.split([p.numel() for p in self._layout_params]), self._layout_params)]

        layout = build_local_layout(blocks=self.blocks, owned_blocks=self.owned_blocks,
                                    param_groups=self.param_groups)
        self._block_slices = dict(layout.block_slices)
        self._segments = layout.segments
        self._owned_params = list(layout.params)
        # One history for all owned blocks; each block's ring is a BlockCurvature over its
        # columns (pairs, W, checkpoints), H·g runs batched over all of them.
        self._batched = BatchedCurvature(
            grad=self._grad, direction=self._direction,
            block_numels=[self.blocks[b].numel for b in self.owned_blocks],
            history_size=self.config.history_size,
            plan=ChunkPlan.for_model([block.numel for block in self.blocks],
                                     device=self._device))
        self._curvature: dict[int, BlockCurvature] = dict(zip(self.owned_blocks,
                                                              self._batched.blocks))
        sizes = layout.param_sizes
        self._grad_views = list(self._grad.split(sizes))
        self._param_views = list(self._param.split(sizes))
        self._pairs = PairFormer(block_slices=self._block_slices, curvature=self._curvature,
                                 config=self.config, numel=n,
                                 max_block_numel=layout.max_block_numel, dtype=self._dtype,
                                 device=self._device)
        self._diagnostics = dict.fromkeys(DIAGNOSTIC_KEYS, math.nan)
        self._synchronized = False   # synchronize() called since the last backward pass
        self._grad_norm = math.nan
        self._global = {
            "step": torch.zeros((), dtype=torch.int64),
            "skipped_steps": torch.zeros((), dtype=torch.int64),
            "sgd_fallbacks": torch.zeros((), dtype=torch.int64),
            "accepted_pairs": torch.zeros((), dtype=torch.int64),
            "rejected_pairs": torch.zeros((), dtype=torch.int64),
            "last_nu": torch.ones((), dtype=torch.float64),
            "last_gamma": torch.full((), math.nan, dtype=torch.float64),
        }

    # ---- public read-outs --------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """Run-wide counters, identical on every rank.

        ``accepted_pairs``/``rejected_pairs`` sum over all blocks; ``sgd_fallbacks`` counts
        steps whose gᵀd was non-finite or non-positive; ``skipped_steps`` counts steps skipped
        for a non-finite gradient; ``last_gamma`` is the mean γ over blocks with curvature;
        ``last_nu`` the step-size factor of the last step.
        """
        return {key: (float(v) if v.is_floating_point() else int(v))
                for key, v in self._global.items()}

    @property
    def diagnostics(self) -> dict[str, float]:
        """What the curvature did in the last step (:data:`~mlbfgs_hpc.stepsize.DIAGNOSTIC_KEYS`),
        summarised over blocks with curvature; identical on every rank, not checkpointed."""
        return dict(self._diagnostics)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (buffers, rings, scratch)."""
        tensors = [self._grad, self._param, self._direction, *self._pairs.tensors(),
                   *self._flat_state.values(), *self._batched.tensors()]
        return sum(t.numel() * t.element_size() for t in tensors) + \
            self._update.numel() * self._update.element_size()

    def check_consistency(self) -> None:
        """Raise ``RuntimeError`` if the parameters differ (bitwise) between ranks."""
        digest = tensor_digest(self._layout_params)
        digests = self.comm.allgather_object(digest)
        if len(set(digests)) != 1:
            raise RuntimeError(f"parameters differ across ranks (CRC32 per rank: {digests})")

    # ---- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.synchronize()
        self._gather_owned()

        # Every decision below uses values gathered from all ranks and reduced in rank order,
        # so all ranks branch identically and nobody is left waiting in a collective.
        if not self._check_and_clip_gradient():
            self._global["skipped_steps"] += 1
            logger.warning("non-finite gradient: step skipped (%d so far)",
                           int(self._global["skipped_steps"]))
            return loss

        self._global["step"] += 1
        t = int(self._global["step"])
        cfg = self.config
        self._apply_weight_decay()
        self._update_momentum_buffers(first=(t == 1))
        if t % cfg.update_freq == 0:
            if t >= 2 * cfg.update_freq:
                self._form_pairs(first=(t == 2 * cfg.update_freq))
            self._flat_state["snap_param"].copy_(self._flat_state["m_param"])
            self._flat_state["snap_grad"].copy_(self._flat_state["m_grad"])

        # H·g for every owned block at once, and per block gᵀd, γ, gᵀg, dᵀd, read back by
        # ONE transfer (on a GPU a float() per block would be a synchronisation each).
        batched = self._batched
        rows = scalar_rows(batched.precondition_().tolist())
        curved_slots = batched.curved
        block_stats = BlockStats.from_rows(rows, curved_slots)
        counts = batched.ring_totals   # summed over the blocks when their rings changed
        local = block_stats.to_row(
            accepted=counts.accepted, rejected=counts.rejected, curved=len(curved_slots),
            tau_sum=counts.tau_sum, tau_count=counts.tau_count)
        totals = StepTotals.from_rank_rows(self.comm.allgather_scalars(local))
        self._global["accepted_pairs"].fill_(totals.accepted)
        self._global["rejected_pairs"].fill_(totals.rejected)
        if totals.curved:
            self._global["last_gamma"].fill_(totals.gamma_sum / totals.curved)

        nu = 1.0
        applied_sq = totals.d_sq_sum   # ‖direction‖² as applied, for the step-scale diagnostic
        # The guard acts only once curvature is in use (DESIGN.md §1.7).
        if totals.curved and (not math.isfinite(totals.g_dot_d) or totals.g_dot_d <= 0.0):
            self._direction.copy_(self._grad)
            self._global["sgd_fallbacks"] += 1
            applied_sq = totals.g_sq_sum
        else:
            if totals.curved and cfg.clip == "graft":
                # Per-block grafting: each curved block's H·g rescaled to the norm of its g
                # (Agarwal et al. 2020); local to the owner, one multiply for all blocks.
                batched.graft_(block_stats.graft_scales)
                applied_sq = totals.g_sq_sum
            elif totals.curved and cfg.clip == "graft-global":
                # One factor for every block on every rank (from the rank-order totals, so
                # identical everywhere): ‖d‖ = ‖g‖ overall, the blocks keep H's relative
                # lengths. Blocks without pairs (d = g) are scaled with the rest.
                scale = global_graft_factor(g_sq=totals.g_sq_sum, d_sq=totals.d_sq_sum)
                batched.graft_(dict.fromkeys(range(len(batched.blocks)), scale))
                applied_sq = totals.g_sq_sum
            batched.write_direction_()
            if totals.curved and cfg.clip == "kl":
                nu = kl_factor(totals.g_dot_d, kl_clip=cfg.kl_clip)
                if nu < 1.0:
                    self._direction.mul_(nu)
                applied_sq = nu * nu * totals.d_sq_sum
        self._global["last_nu"].fill_(nu)
        self._diagnostics = totals.diagnostics(applied_sq=applied_sq)

        self._apply_outer_momentum(first=(t == 1))
        self.comm.allgatherv_(self._update, self.ownership.counts, self.ownership.offsets,
                              node_aware=self.node_aware)
        torch._foreach_sub_(self._layout_params, self._update_views)
        return loss

    def synchronize(self) -> None:
        """Wait until this step's gradients are averaged over the ranks (as Horovod's
        ``DistributedOptimizer.synchronize``); :meth:`step` then does not wait again.

        Call it between ``backward()`` and :meth:`step` to read or change the averaged
        gradients yourself: with ``grad_reduce="allreduce"`` every ``.grad`` then holds the
        average on every rank (e.g. for ``torch.nn.utils.clip_grad_norm_``). With
        ``"reducescatter"`` ``.grad`` is not averaged; clip with ``max_grad_norm`` instead.
        """
        if self._reducer is not None and not self._synchronized:
            self._reducer.synchronize()
        self._synchronized = True

    def _gradients_changed(self, _param: torch.Tensor) -> None:
        self._synchronized = False

    @property
    def last_grad_norm(self) -> float:
        """Global norm of the averaged gradient before clipping, at the last step whose
        gradient was finite (``max_grad_norm`` set; NaN otherwise or before the first)."""
        return self._grad_norm

    def _check_and_clip_gradient(self) -> bool:
        """Whether every rank's gradient is finite (else the step is skipped everywhere);
        with ``max_grad_norm``, the gradient is then clipped to it by one factor from the
        global norm. Both from ONE allgather of :func:`~mlbfgs_hpc.flatops.gradient_row`."""
        max_norm = self.config.max_grad_norm
        row = gradient_row(self._grad, measure_norm=max_norm is not None)
        totals = sum_in_rank_order(self.comm.allgather_scalars(row))
        if totals[0] > 0:
            return False
        if max_norm is not None:
            self._grad_norm = math.sqrt(totals[1])
            factor = clip_factor(totals[1], max_norm)
            if factor < 1.0:
                self._grad.mul_(factor)
        return True

    def _gather_owned(self) -> None:
        owned = None if self._reducer is None else self._reducer.owned_grad
        if owned is not None:  # reduce-scatter: the averaged owned slice, already flat
            self._grad.copy_(owned)
        elif self._owned_params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in self._owned_params]
            torch._foreach_copy_(self._grad_views, [g.reshape(-1) for g in grads])
        if self._owned_params:
            torch._foreach_copy_(self._param_views, [p.reshape(-1) for p in self._owned_params])

    def _apply_weight_decay(self) -> None:
        for seg in self._segments:
            wd = self.param_groups[seg.group]["weight_decay"]
            if wd:
                self._grad[seg.start:seg.stop].add_(self._param[seg.start:seg.stop], alpha=wd)

    def _update_momentum_buffers(self, *, first: bool) -> None:
        m_param, m_grad = self._flat_state["m_param"], self._flat_state["m_grad"]
        if first:  # normalised EMAs start at the first value (no bias correction)
            m_param.copy_(self._param)
            m_grad.copy_(self._grad)
        else:
            m_param.lerp_(self._param, 1.0 - self.config.beta_param)
            m_grad.lerp_(self._grad, 1.0 - self.config.beta_grad)

    def _form_pairs(self, *, first: bool) -> None:
        self._pairs.form_(self._flat_state, first=first)
        self._batched.refresh()

    def _apply_outer_momentum(self, *, first: bool) -> None:
        """Heavy-ball momentum (:func:`~mlbfgs_hpc.flatops.heavy_ball_`) and the update
        ``lr·step vector``, with each param group's μ and lr as they are at this step, so a
        scheduler may change both."""
        buf, nesterov = self._flat_state["momentum_buffer"], self.config.nesterov
        momenta = [group["momentum"] for group in self.param_groups]
        if len(set(momenta)) == 1:   # the usual case: one μ, whole-slice ops
            whole = heavy_ball_(buf, self._direction, momenta[0], nesterov=nesterov, first=first)
            parts = [(seg, whole[seg.start:seg.stop]) for seg in self._segments]
        else:
            parts = [(seg, heavy_ball_(buf[seg.start:seg.stop],
                                       self._direction[seg.start:seg.stop], momenta[seg.group],
                                       nesterov=nesterov, first=first))
                     for seg in self._segments]
        for seg, step_vector in parts:
            lr = self.param_groups[seg.group]["lr"]
            torch.mul(step_vector, lr, out=self._owned_update[seg.start:seg.stop])

    # ---- state -------------------------------------------------------------------------
    def block_state(self, block: int) -> dict[str, torch.Tensor]:
        """Views of one owned block's state tensors (flat buffers sliced, curvature ring)."""
        sl = self._block_slices[block]
        state = {key: buf[sl] for key, buf in self._flat_state.items()}
        state.update(self._curvature[block].state_tensors())
        return state

    def state_dict(self, *, include_blocks: bool = True) -> dict[str, Any]:
        """Fixed-shape tensor state of the blocks this rank owns, plus global counters.

        ``{"state": {block: {name: tensor}}, "global": {...}, "param_groups": [...],
        "config": {...}, "blocks": [...], "format_version": 1}``; block tensors are copies.

        Args:
            include_blocks: ``False`` leaves ``state`` empty (no copy of the per-block
                buffers); the checkpoint writer takes those from :meth:`block_state` instead.
        """
        return pack_state(
            block_states=((b, self.block_state(b))
                          for b in (self.owned_blocks if include_blocks else ())),
            global_state=self._global, param_groups=self.param_groups,
            config=self.config.to_dict(), blocks=self.blocks)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state saved on any number of ranks: this rank takes the blocks it owns.

        Raises:
            ValueError: the block table differs from this optimizer's, or a block this rank
                owns is missing from ``state_dict``.
        """
        check_saved_state(state_dict, blocks=self.blocks, owned_blocks=self.owned_blocks,
                          n_groups=len(self.param_groups))
        for b in self.owned_blocks:
            saved_block = state_dict["state"][b]
            sl = self._block_slices[b]
            for key in FLAT_STATE_KEYS:
                self._flat_state[key][sl].copy_(saved_block[key])
            self._curvature[b].load_state_tensors(saved_block)
        self._batched.refresh()
        for key in GLOBAL_STATE_KEYS:
            self._global[key].copy_(state_dict["global"][key])
        load_group_settings(self.param_groups, state_dict["param_groups"])

