"""mL-BFGS as a ``torch.optim.Optimizer``, block-diagonal and split across MPI ranks.

Layout on p ranks (ownership from :mod:`mlbfgs_hpc.partition`)::

    flat vector:  | block 0 | block 1 | block 2 | block 3 | block 4 |
    owner:        |  rank 0           | rank 1  |  rank 2           |
    per rank:      m_param, m_grad, snapshots, outer momentum  -> flat over the owned slice
                   the curvature history of the owned columns  -> the mode's (below)
    every rank:    the full update vector (Allgatherv target), applied to all parameters

Step on every rank (the design of the package, §1–§2)::

    gradients reduce-scattered to their owners    -> owned gradient/params into flat buffers
      (GradientReducer; or allreduced)
    allgather(non-finite flags, who has a grad)   -> skip the step everywhere if any rank saw a
      (mlbfgs_hpc.step_check)                        non-finite gradient, stop a diverged run;
                                                     leave parameters without gradient alone
    the mode's step:
      stochastic (default; mlbfgs_hpc.stochastic): EMAs, pairs every T steps, H·g per owned
        block (block-diagonal), grafting, outer momentum -> Allgatherv(update) -> θ ← θ − update
      line-searched (line_search_fn; mlbfgs_hpc.searched): one L-BFGS history of the whole
        vector, its columns on their owners; up to max_iter iterations, each a strong-Wolfe
        search on the rank-averaged loss -> Allgatherv(direction) -> θ ← θ + t·d

With one process the communicator is local and every collective is the identity. Parameters
without gradient or frozen: :mod:`mlbfgs_hpc.participation`; diverged runs:
:mod:`mlbfgs_hpc.divergence`; copies, hooks, torch.distributed.checkpoint: :mod:`.torch_interop`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from .blocks import ParamBlock, blocks_from_parameters, check_blocks_cover
from .comm import (GRAD_BACKENDS, GRAD_REDUCE_MODES, GradBackend, GradientReducer, GradReduce,
                   LocalCommunicator, tensor_digest)
from .config import (MLBFGSConfig, check_searched_config, check_searched_group,
                     line_search_settings, mode_defaults, validate_group_hyperparameters)
from .divergence import DEFAULT_MAX_CONSECUTIVE_SKIPS
from .layout import build_local_layout
from .optimizer_state import (FLAT_STATE_KEYS, GLOBAL_STATE_KEYS, GRAD_STEPS_KEY,
                              check_saved_state, load_group_settings, log_changed_settings,
                              new_global_state, pack_state)
from .participation import ParticipationTracker, StepParticipation
from .partition import Ownership
from .searched import SearchedSteps
from .step_check import StepGate
from .stochastic import StochasticSteps
from .torch_interop import (ReleasedHooks, called_by_distributed_checkpoint, copy_reduction,
                            refuse_distributed_checkpoint)

logger = logging.getLogger(__name__)


class MLBFGS(torch.optim.Optimizer):
    """Momentum-based stochastic L-BFGS (Niu et al., TMLR 2023), block-wise and distributed;
    with ``line_search_fn``, a line-searched L-BFGS for exact gradients (``torch.optim.LBFGS``'s
    iteration on p ranks).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer. Groups may set
            their own ``lr``, ``weight_decay`` and ``momentum`` (schedulers may change them
            between steps, e.g. ``OneCycleLR``'s momentum cycling). Frozen parameters may be
            among them: as torch's rule, a parameter frozen or without ``.grad`` (on every
            rank) at step time is left alone, and one unfrozen later trains
            (:mod:`mlbfgs_hpc.participation`).
        blocks: the blocks of the block-diagonal Hessian, e.g. ``build_blocks(model)``; they
            must cover exactly the optimized parameters (frozen ones included). ``None``:
            one block per parameter tensor.
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
        line_search_fn: ``"strong_wolfe"``: ``step(closure)`` runs up to ``max_iter``
            L-BFGS iterations per call, each with torch's strong-Wolfe search, on one history
            of the whole vector whose columns stay with their owners
            (:mod:`mlbfgs_hpc.searched`); the defaults of ``None`` arguments then serve exact
            gradients (:data:`~mlbfgs_hpc.config.SEARCHED_DEFAULTS`: lr 1, m 100, T 1, no
            EMAs, damping window, grafting or outer momentum). ``None``: the stochastic step.
        max_iter, max_eval, tolerance_grad, tolerance_change: as ``torch.optim.LBFGS``'s
            (:class:`~mlbfgs_hpc.config.LineSearchConfig`); with ``line_search_fn`` only.
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
        max_consecutive_skips: raise :class:`~mlbfgs_hpc.divergence.TrainingDivergedError`
            after this many steps in a row skipped for a non-finite gradient (``None``:
            never); a non-finite parameter raises at once.

    Raises:
        ValueError: a hyper-parameter is out of range, blocks and params disagree, or the
            parameters mix dtypes or devices.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        *,
        blocks: Sequence[ParamBlock] | None = None,
        lr: float | None = None,
        weight_decay: float = 0.0,
        history_size: int | None = None,
        update_freq: int | None = None,
        beta_param: float | None = None,
        beta_grad: float | None = None,
        damping: float | None = None,
        sigma_low: float | None = None,
        sigma_high: float | None = None,
        curvature_eps: float = 1e-8,
        clip: str | None = None,
        kl_clip: float = 0.005,
        momentum: float | None = None,
        nesterov: bool = False,
        pair_momentum: float = 0.0,
        double_damping: float | None = None,
        max_grad_norm: float | None = None,
        line_search_fn: str | None = None,
        max_iter: int | None = None,
        max_eval: int | None = None,
        tolerance_grad: float | None = None,
        tolerance_change: float | None = None,
        comm: LocalCommunicator | None = None,
        grad_backend: GradBackend | None = "auto",
        grad_reduce: GradReduce = "allreduce",
        node_aware: bool | None = None,
        grad_overlap: bool = True,
        max_consecutive_skips: int | None = DEFAULT_MAX_CONSECUTIVE_SKIPS,
    ) -> None:
        # What a copy is rebuilt from (torch_interop): every argument but the tensors and comm.
        self._constructor_kwargs = {k: v for k, v in locals().items()
                                    if k not in ("self", "params", "blocks", "comm", "__class__")}
        self.line_search = line_search_settings(
            line_search_fn=line_search_fn, max_iter=max_iter, max_eval=max_eval,
            tolerance_grad=tolerance_grad, tolerance_change=tolerance_change)
        values = mode_defaults(
            {"lr": lr, "history_size": history_size, "update_freq": update_freq,
             "beta_param": beta_param, "beta_grad": beta_grad, "damping": damping,
             "sigma_low": sigma_low, "sigma_high": sigma_high, "clip": clip,
             "momentum": momentum, "double_damping": double_damping},
            searched=self.line_search is not None)
        self.config = MLBFGSConfig(
            curvature_eps=curvature_eps, kl_clip=kl_clip, nesterov=nesterov,
            pair_momentum=pair_momentum, max_grad_norm=max_grad_norm,
            **{k: v for k, v in values.items() if k not in ("lr", "momentum")})
        if self.line_search is not None:
            check_searched_config(self.config)
        if grad_backend is not None and grad_backend not in GRAD_BACKENDS:
            raise ValueError(
                f"grad_backend must be one of {GRAD_BACKENDS} or None, got {grad_backend!r}")
        if grad_reduce not in GRAD_REDUCE_MODES:
            raise ValueError(
                f"grad_reduce must be one of {GRAD_REDUCE_MODES}, got {grad_reduce!r}")
        self._constructing = True
        super().__init__(params, {"lr": values["lr"], "weight_decay": weight_decay,
                                  "momentum": values["momentum"]})
        self._constructing = False
        self.comm = comm if comm is not None else LocalCommunicator()

        # Every parameter given is held, frozen ones too: taking part is read at every step.
        group_params = [p for group in self.param_groups for p in group["params"]]
        self.blocks = list(blocks) if blocks is not None else blocks_from_parameters(group_params)
        check_blocks_cover(self.blocks, group_params)
        self._layout_params = [p for block in self.blocks for p in block.params]
        self.param_names = [n for block in self.blocks for n in block.param_names]
        first = self._layout_params[0]
        self._dtype, self._device = first.dtype, first.device

        self.ownership = Ownership.build(block_numels=[b.numel for b in self.blocks],
                                         world_size=self.comm.size)
        self.node_aware = self.comm.resolve_node_aware(node_aware)
        self._build_local_layout()
        self._reducer = (None if grad_backend is None else GradientReducer(
            comm=self.comm, named_params=list(zip(self.param_names, self._layout_params)),
            backend=grad_backend, mode=grad_reduce, ownership=self.ownership,
            node_aware=node_aware, overlap=grad_overlap))
        #: The backend taken (``"auto"`` resolved on more than one rank), or ``None``.
        self.grad_backend = grad_backend if self._reducer is None else self._reducer.backend
        self.grad_reduce = grad_reduce
        # Any backward pass makes new gradients: synchronize() must wait for them again, even
        # when no step() came in between (a GradScaler that skipped an overflowed step). The
        # hooks, and the reducer's, are removed when the optimizer is collected.
        self._hooks = ReleasedHooks(self._gradients_changed, self._layout_params, also=(
            None if self._reducer is None else self._reducer.remove_hooks))
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
        if self.line_search is not None:
            check_searched_group(values)
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
        self._block_position = {b: k for k, b in enumerate(self.owned_blocks)}
        self._segments = layout.segments
        self._owned_params = list(layout.params)
        self._participation = ParticipationTracker(
            params=self._layout_params, names=self.param_names, spans=layout.param_spans,
            first_param=layout.first_param)
        self._gate = StepGate(comm=self.comm, participation=self._participation,
                              max_grad_norm=self.config.max_grad_norm,
                              max_consecutive_skips=self._constructor_kwargs[
                                  "max_consecutive_skips"])
        sizes = layout.param_sizes
        self._grad_views = list(self._grad.split(sizes))
        self._param_views = list(self._param.split(sizes))
        self._synchronized = False   # synchronize() called since the last backward pass
        self._global = new_global_state()
        # The mode's curvature and step: one history of the whole vector and searched steps
        # (mlbfgs_hpc.searched), or the owned blocks' histories (mlbfgs_hpc.stochastic).
        self._searched: SearchedSteps | None = None
        self._stochastic: StochasticSteps | None = None
        if self.line_search is not None:
            self._searched = SearchedSteps.for_optimizer(self)
        else:
            self._stochastic = StochasticSteps(self, max_block_numel=layout.max_block_numel)

    # ---- public read-outs --------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """Run-wide counters, identical on every rank.

        ``accepted_pairs``/``rejected_pairs`` sum over all blocks; ``sgd_fallbacks`` counts
        steps whose gᵀd was non-finite or non-positive; ``skipped_steps`` counts steps skipped
        for a non-finite gradient; ``last_gamma`` is the mean γ over blocks with curvature;
        ``last_nu`` the step-size factor of the last step. With ``line_search_fn``: ``step``
        counts L-BFGS iterations, ``func_evals`` closure evaluations (as
        ``torch.optim.LBFGS``'s state) and ``last_step_length`` is the last search's t.
        """
        tensors = dict(self._global)
        if self._searched is not None:
            tensors.update(func_evals=self._searched.func_evals,
                           last_step_length=self._searched.last_step_length)
        return {key: (float(v) if v.is_floating_point() else int(v))
                for key, v in tensors.items()}

    @property
    def diagnostics(self) -> dict[str, float]:
        """What the curvature did in the last step (:data:`~mlbfgs_hpc.stepsize.DIAGNOSTIC_KEYS`),
        summarised over blocks with curvature; identical on every rank, not checkpointed.
        Empty with ``line_search_fn`` (no grafting, no guard: :attr:`counters` say it all)."""
        return {} if self._stochastic is None else dict(self._stochastic.diagnostics)

    def optimizer_state_bytes(self) -> int:
        """Bytes of optimizer state held by this rank (buffers, rings, scratch)."""
        mode = self._searched if self._searched is not None else self._stochastic
        assert mode is not None
        curvature = mode.tensors()
        tensors = [self._grad, self._param, self._direction, *curvature,
                   *self._flat_state.values()]
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
        """One optimizer step. With ``line_search_fn``, ``closure`` is required (it zeroes the
        gradients, returns this rank's loss on its own shard and back-propagates it) and the
        step is up to ``max_iter`` searched iterations returning the starting loss averaged
        over the ranks (:mod:`mlbfgs_hpc.searched`)."""
        if not any(g["lr"] for g in self.param_groups) and called_by_distributed_checkpoint():
            return None   # DCP's "initialising" step at lr 0 (torch_interop): change nothing
        if self._searched is not None:
            return self._searched.step(closure, self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._gather_owned()
        # Every decision below uses values gathered from all ranks and reduced in rank order,
        # so all ranks branch identically and nobody is left waiting in a collective.
        taking_part = self._check_step()
        if taking_part is not None:   # None: a non-finite gradient somewhere, skipped
            assert self._stochastic is not None
            self._stochastic.step(taking_part)
        return loss

    def synchronize(self) -> None:
        """Wait until this step's gradients are averaged over the ranks (as Horovod's
        ``DistributedOptimizer.synchronize``); :meth:`step` then does not wait again.

        Call it between ``backward()`` and :meth:`step` to read or change the averaged
        gradients yourself: with ``grad_reduce="allreduce"`` every ``.grad`` then holds the
        average on every rank (e.g. for ``torch.nn.utils.clip_grad_norm_``). With
        ``"reducescatter"`` ``.grad`` is not averaged; clip with ``max_grad_norm`` instead.
        """
        if self._hooks.attach():   # unfrozen since: their gradients came without a hook
            self._synchronized = False
        if not self._synchronized:
            self._participation.check_dense()
            if self._reducer is not None:
                if self.comm.size > 1:   # the averaging turns a missing .grad into zeros
                    self._participation.before_averaging()
                self._reducer.synchronize()
        self._synchronized = True

    def _gradients_changed(self, _param: torch.Tensor) -> None:
        self._synchronized = False

    @property
    def last_grad_norm(self) -> float:
        """Global norm of the averaged gradient before clipping, at the last step whose
        gradient was finite (``max_grad_norm`` set; NaN otherwise or before the first)."""
        return self._gate.grad_norm

    def _check_step(self) -> StepParticipation | None:
        """Who takes part, or ``None``: skipped everywhere (:class:`.step_check.StepGate`)."""
        taking_part = self._gate.check(grad=self._grad, params=self._param,
                                       steps_taken=int(self._global["step"]),
                                       skipped_before=int(self._global["skipped_steps"]))
        if taking_part is None:
            self._global["skipped_steps"] += 1
        return taking_part

    def _gather_owned(self) -> None:
        self._gather_owned_grad()
        self._read_owned_params()

    def _gather_owned_grad(self) -> None:
        """Wait for the averaged gradients (:meth:`synchronize`); the owned ones into the
        flat ``_grad`` (zeros where ``.grad`` is None)."""
        self.synchronize()
        owned = None if self._reducer is None else self._reducer.owned_grad
        if owned is not None:  # reduce-scatter: the averaged owned slice, already flat
            self._grad.copy_(owned)
        elif self._owned_params:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in self._owned_params]
            torch._foreach_copy_(self._grad_views, [g.reshape(-1) for g in grads])

    def _read_owned_params(self) -> None:
        """The owned parameters into the flat ``_param``."""
        if self._owned_params:
            torch._foreach_copy_(self._param_views, [p.reshape(-1) for p in self._owned_params])

    # ---- state, copies -----------------------------------------------------------------
    def block_state(self, block: int) -> dict[str, torch.Tensor]:
        """One owned block's state tensors: views of the flat buffers' slices and the
        curvature ring, and the steps each of its parameters took part in (a copy)."""
        sl = self._block_slices[block]
        state = {key: buf[sl] for key, buf in self._flat_state.items()}
        state.update(self._searched.curvature.block_state(sl) if self._searched is not None
                     else self._stochastic.curvature[block].state_tensors())  # type: ignore
        state[GRAD_STEPS_KEY] = self._participation.block_grad_steps(self._block_position[block])
        return state

    def state_dict(self, *, include_blocks: bool = True) -> dict[str, Any]:
        """Fixed-shape tensor state of the blocks this rank owns, plus global counters.

        ``{"state": {block: {name: tensor}}, "global": {...}, "param_groups": [...],
        "config": {...}, "blocks": [...], "format_version": 1}``; block tensors are copies.

        Args:
            include_blocks: ``False`` leaves ``state`` empty (no copy of the per-block
                buffers); the checkpoint writer takes those from :meth:`block_state` instead.

        Raises:
            NotImplementedError: called by torch.distributed.checkpoint (see
                :mod:`~mlbfgs_hpc.torch_interop`).
        """
        refuse_distributed_checkpoint()
        state = pack_state(
            block_states=((b, self.block_state(b))
                          for b in (self.owned_blocks if include_blocks else ())),
            global_state=self._global, param_groups=self.param_groups,
            config=self.config.to_dict(), blocks=self.blocks)
        if self._searched is not None:   # the whole-vector history's scalars and Gram
            assert self.line_search is not None
            state["config"]["line_search"] = self.line_search.to_dict()
            state["line_search"] = {k: v.clone()
                                    for k, v in self._searched.state_tensors().items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any], *,
                        warn_changed_settings: bool = True) -> None:
        """Load state saved on any number of ranks: this rank takes the blocks it owns.

        Settings of the state that differ from this optimizer's (``update_freq``, ...) keep
        this optimizer's value; ``warn_changed_settings`` logs them (rank 0).

        Raises:
            ValueError: the block table differs from this optimizer's, or a block this rank
                owns is missing from ``state_dict``.
            NotImplementedError: called by torch.distributed.checkpoint.
        """
        refuse_distributed_checkpoint()
        check_saved_state(state_dict, blocks=self.blocks, owned_blocks=self.owned_blocks,
                          n_groups=len(self.param_groups), searched=self._searched is not None)
        for b in self.owned_blocks:
            saved_block = state_dict["state"][b]
            sl = self._block_slices[b]
            for key in FLAT_STATE_KEYS:
                self._flat_state[key][sl].copy_(saved_block[key])
            if self._stochastic is not None:
                self._stochastic.curvature[b].load_state_tensors(saved_block)
            self._participation.load_block_grad_steps(
                self._block_position[b], saved_block.get(GRAD_STEPS_KEY),
                steps=int(state_dict["global"]["step"]))
        if self._searched is not None:
            self._searched.load(state_dict["line_search"], [
                (self._block_slices[b], state_dict["state"][b]) for b in self.owned_blocks])
        else:
            assert self._stochastic is not None
            self._stochastic.batched.refresh()
        for key in GLOBAL_STATE_KEYS:
            self._global[key].copy_(state_dict["global"][key])
        load_group_settings(self.param_groups, state_dict["param_groups"])
        if warn_changed_settings and self.comm.rank == 0:
            log_changed_settings(state_dict.get("config", {}), self.config.to_dict())

    def __reduce__(self) -> tuple[Any, ...]:
        """``copy.deepcopy``/``pickle``: rebuilt and loaded (one process; torch_interop)."""
        return copy_reduction(self, self._constructor_kwargs)
