"""``MLBFGS.step(closure)`` with a line search: ``torch.optim.LBFGS``'s iteration, on p ranks.

Each rank's closure returns the loss of its own shard and back-propagates it; the optimizer
averages losses and gradients over the ranks. Every decision below is taken on scalars that
were all-gathered and summed in rank order, so they are bitwise the same on every rank: every
rank evaluates the closure the same number of times, and no rank can leave the others waiting
in a collective (``torch.optim.LBFGS`` under DDP can: its ranks search on their own losses).
One ``step()``::

    closure() at θ          -> f, g         [gradient average; allgather f, max|g|, ‖g‖₁]
    max|g| ≤ tolerance_grad -> done
    up to max_iter times:
      EMA buffers (β = 0: θ and g themselves); every T iterations a pair from their change
                                            [allgather of the pair's products, GlobalCurvature]
      d = −H·g on the owned columns         [allgather of [S; Ŷ]·g, ‖g‖²]
      gᵀd ≥ −tolerance_change -> done
      Allgatherv(d)                         -> every rank holds the whole d
      strong-Wolfe search along d: each trial sets θ + t·d, one closure() on every rank
                                            [gradient average; allgather f, gᵀd, max|g|]
      θ ← θ + t·d, f and g from the accepted trial (its gradient is kept, not recomputed)
      stop on max_eval, max|g| ≤ tolerance_grad, t·max|d| ≤ tolerance_change or
      |Δf| < tolerance_change

With β = 0 and T = 1 (the defaults here) a pair is (tₖ₋₁·dₖ₋₁, gₖ − gₖ₋₁), the pair of
``torch.optim.LBFGS``: s is the step the search chose, not the difference of the stored
iterates, which in float32 differs from it by the rounding of θ + t·d (late in a run, when
|t·d| ≪ |θ|, by percents per element; measured: with the stored difference MLBFGS stalled
above torch's error on the Poisson PINN, with t·d it reaches what torch reaches). Within one
``step()`` both gradients come from the same closure; across ``step()`` calls, from the
closures of consecutive calls (a new mini-batch each, when the caller resamples). The last
step lives in the flat buffer ``momentum_buffer`` (unused otherwise: a search takes no
momentum), so checkpoints carry it. With β > 0 or T > 1 the pairs are mL-BFGS's momentum
pairs (the EMAs' change).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .comm import LocalCommunicator
from .config import LineSearchConfig, MLBFGSConfig
from .flatops import update_emas_, zero_spans_
from .global_curvature import MIN_CURVATURE, GlobalCurvature
from .linesearch import LinePoint, WolfeSettings, strong_wolfe_search
from .participation import EVERYONE, StepParticipation
from .partition import Ownership
from .stepsize import sum_in_rank_order

logger = logging.getLogger(__name__)

#: The searched mode's own counters (checkpointed beside the curvature's global state).
SEARCH_STATE_KEYS: tuple[str, ...] = ("func_evals", "last_step_length")


class SearchedSteps:
    """The line-searched ``step(closure)`` of :class:`~mlbfgs_hpc.MLBFGS`.

    Args:
        comm: the communicator.
        params: every optimized parameter, in the flat layout's order.
        ownership: the flat vector's slices per rank.
        node_aware: the update ``Allgatherv``'s path.
        curvature: the history (owned columns).
        config: the optimizer's constants (``beta_param``, ``beta_grad``, ``update_freq``).
        settings: the iteration and search settings.
        gather_grad: after a closure: waits for the averaged gradients and copies the owned
            gradient into ``grad``.
        read_params: copies the owned parameters into ``param``.
        check_step: the optimizer's step check after the first closure (a non-finite
            parameter, who takes part, a non-finite gradient: ``None``, the step is skipped;
            it counts the skip and raises on a diverged run).
        commit: records that the parameters of a decision took part in an iteration.
        grad: the owned flat gradient (written by ``gather_grad``).
        param: the owned flat parameters (written by ``read_params``).
        flat_state: the owned EMA buffers ``m_param``, ``m_grad``, ``snap_param``,
            ``snap_grad``.
        counters: the optimizer's run-wide counters (``step`` counts iterations here).
        direction: the full flat vector that receives d (the update buffer), with
            ``owned_direction`` its owned slice and ``direction_views`` its per-parameter
            views.
    """

    def __init__(self, *, comm: LocalCommunicator, params: Sequence[torch.Tensor],
                 ownership: Ownership, node_aware: bool, curvature: GlobalCurvature,
                 config: MLBFGSConfig, settings: LineSearchConfig,
                 gather_grad: Callable[[], None], read_params: Callable[[], None],
                 check_step: Callable[[], StepParticipation | None],
                 commit: Callable[[StepParticipation], None],
                 grad: torch.Tensor, param: torch.Tensor,
                 flat_state: Mapping[str, torch.Tensor], counters: Mapping[str, torch.Tensor],
                 direction: torch.Tensor, owned_direction: torch.Tensor,
                 direction_views: Sequence[torch.Tensor]) -> None:
        self.comm, self.params, self.ownership = comm, list(params), ownership
        self.node_aware, self.curvature = node_aware, curvature
        self.config, self.settings = config, settings
        self.wolfe = WolfeSettings(tolerance_change=settings.tolerance_change)
        self._gather_grad, self._read_params = gather_grad, read_params
        self._check_step, self._commit = check_step, commit
        self.grad, self.param = grad, param
        self.flat_state, self.counters = flat_state, counters
        self.direction, self.owned_direction = direction, owned_direction
        self.direction_views = list(direction_views)
        # The iterate at the start of a search (every element, on every rank), and the
        # gradients the search may hand back.
        self._start = torch.zeros_like(direction)
        self._start_views = [v.view_as(p) for v, p in zip(
            self._start.split([p.numel() for p in self.params]), self.params)]
        self._g = torch.zeros_like(grad)        # gradient at the current iterate
        self._g_kept = torch.zeros_like(grad)   # gradient of the search's best trial
        self._taking_part = EVERYONE            # this step's decision
        self.func_evals = torch.zeros((), dtype=torch.int64)
        self.last_step_length = torch.full((), math.nan, dtype=torch.float64)
        #: Closure evaluations of the last step() (a diagnostic).
        self.last_step_evals = 0
        self._warned_no_progress = False
        # torch's pairs (β = 0, T = 1): s = t·d of the last move, kept where a search has no
        # use for the outer momentum's buffer (and so in every checkpoint).
        self._pairs_from_steps = (config.beta_param == 0.0 and config.beta_grad == 0.0
                                  and config.update_freq == 1)
        self._last_step = flat_state["momentum_buffer"]

    @classmethod
    def for_optimizer(cls, optimizer: Any) -> SearchedSteps:
        """The searched steps of an :class:`~mlbfgs_hpc.MLBFGS` built with
        ``line_search_fn``, on its flat buffers, counters and step check (the optimizer's
        own collaborator: it reads the optimizer's private layout)."""
        o, cfg = optimizer, optimizer.config
        curvature = GlobalCurvature(
            numel=o._owned_numel, history_size=cfg.history_size, dtype=o._dtype,
            device=o._device, curvature_eps=cfg.curvature_eps, min_curvature=MIN_CURVATURE,
            damping=cfg.damping,
            sigma_low=cfg.sigma_low, sigma_high=cfg.sigma_high)
        return cls(comm=o.comm, params=o._layout_params, ownership=o.ownership,
                   node_aware=o.node_aware, curvature=curvature, config=cfg,
                   settings=o.line_search, gather_grad=o._gather_owned_grad,
                   read_params=o._read_owned_params, check_step=o._check_step,
                   commit=o._participation.commit, grad=o._grad, param=o._param,
                   flat_state=o._flat_state, counters=o._global, direction=o._update,
                   owned_direction=o._owned_update, direction_views=o._update_views)

    # ---- state ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The counters and the curvature's global state (the same on every rank)."""
        return {"func_evals": self.func_evals, "last_step_length": self.last_step_length,
                **self.curvature.global_state()}

    def load(self, state: Mapping[str, torch.Tensor],
             columns: Sequence[tuple[slice, Mapping[str, torch.Tensor]]]) -> None:
        """Load :meth:`state_tensors` and the owned blocks' S and Ŷ columns (by slice)."""
        self.func_evals.copy_(state["func_evals"])
        self.last_step_length.copy_(state["last_step_length"])
        self.curvature.load(state, columns)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        return [self._start, self._g, self._g_kept, *self.curvature.tensors()]

    # ---- evaluations ----------------------------------------------------------------------
    def _evaluate(self, closure: Callable[[], torch.Tensor],
                  row_of: Callable[[], list[float]]) -> tuple[float, Any]:
        """Run the closure, gather the owned gradient, all-gather ``[loss, *row_of()]``.

        Returns the loss averaged over ranks (summed in rank order) and the (ranks × values)
        array of every rank's row."""
        with torch.enable_grad():
            value = closure()
        # A closure usually returns the loss it back-propagated, still attached to the graph
        # (as in torch's examples): read it without the autograd warning.
        local = float(value.detach() if isinstance(value, torch.Tensor) else value)
        self._gather_grad()
        self.func_evals += 1
        rows = self.comm.allgather_scalars([local, *row_of()])
        return sum_in_rank_order(rows[:, :1])[0] / len(rows), rows

    def _set_params(self, t: float) -> None:
        """θ ← start + t·d on every parameter (the same arithmetic on every rank)."""
        torch._foreach_copy_(self.params, self._start_views)
        if t != 0.0:
            torch._foreach_add_(self.params, self.direction_views, alpha=t)

    # ---- the step -------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor] | None,
             param_groups: Sequence[Mapping[str, Any]]) -> torch.Tensor | None:
        """One ``step()``: up to ``max_iter`` searched L-BFGS iterations.

        Returns:
            The global loss at the starting point (as ``torch.optim.LBFGS`` returns the
            closure's first value). A step whose loss or gradient is not finite there is
            skipped (parameters untouched; see ``check_step``).

        Raises:
            ValueError: no closure, or param groups with different lrs.
        """
        if closure is None:
            raise ValueError("MLBFGS with line_search_fn needs step(closure): the search "
                             "evaluates the loss at several points (as torch.optim.LBFGS)")
        lrs = {group["lr"] for group in param_groups}
        if len(lrs) != 1:
            raise ValueError(f"with line_search_fn every param group must have the same lr "
                             f"(the first trial step of one search), got {sorted(lrs)}")
        lr = lrs.pop()
        s = self.settings
        evals_before = int(self.func_evals)
        grad = self.grad

        loss, _ = self._evaluate(closure, list)
        self._read_params()
        first_loss = torch.tensor(loss, dtype=torch.float64)
        self.last_step_evals = 1
        taking_part = self._check_step()   # zeroes frozen gradients; may raise (diverged)
        if taking_part is None:
            return first_loss
        if not math.isfinite(loss):
            self.counters["skipped_steps"] += 1
            logger.warning("non-finite loss: step skipped (%d so far)",
                           int(self.counters["skipped_steps"]))
            return first_loss
        self._taking_part = taking_part
        g_l1, g_max = self._global_norms(grad)
        if g_max <= s.tolerance_grad:
            return first_loss
        self._g.copy_(grad)
        for _ in range(s.max_iter):
            self.counters["step"] += 1
            iteration = int(self.counters["step"])
            self._commit(taking_part)
            self._update_pairs(iteration)
            g_dot_d = self._descent_direction()
            if not (math.isfinite(g_dot_d) and g_dot_d < -s.tolerance_change):
                break
            t_init = lr * min(1.0, 1.0 / g_l1) if iteration == 1 else lr
            self.comm.allgatherv_(self.direction, self.ownership.counts,
                                  self.ownership.offsets, node_aware=self.node_aware)
            d_max = float(self.direction.abs().max())
            torch._foreach_copy_(self._start_views, self.params)
            previous_loss = loss
            # What is left of the step's budget, as torch gives its search (its max_ls,
            # plus the first trial, which always runs).
            budget = s.max_eval - (int(self.func_evals) - evals_before) + 1
            point, g_max, evals = self._search(closure, start=LinePoint(0.0, loss, g_dot_d),
                                               t_init=t_init, d_max=d_max, g_max=g_max,
                                               budget=max(1, budget))
            self.last_step_evals += evals
            loss = point.loss
            self.last_step_length.fill_(point.t)
            if self._pairs_from_steps:
                torch.mul(self.owned_direction, point.t, out=self._last_step)
            if point.t == 0.0:
                self._warn_no_progress(previous_loss)
            if int(self.func_evals) - evals_before >= s.max_eval:
                break
            if g_max <= s.tolerance_grad:
                break
            if point.t * d_max <= s.tolerance_change:
                break
            if abs(loss - previous_loss) < s.tolerance_change:
                break
        return first_loss

    def _warn_no_progress(self, loss: float) -> None:
        """Once per optimizer: the search found no lower loss along a descent direction. At
        the rounding floor of the parameters' dtype every later step repeats that search (the
        state does not change), as torch.optim.LBFGS's would."""
        if self._warned_no_progress:
            return
        self._warned_no_progress = True
        dtype = self.grad.dtype
        logger.warning("the line search found no loss below %.9g along a descent direction "
                       "(step length 0): the loss and its gradient disagree at this "
                       "precision (%s)%s; later steps that end the same way are not "
                       "reported", loss, str(dtype).replace("torch.", ""),
                       ": float64 parameters remove this floor" if dtype == torch.float32
                       else "")

    def _global_norms(self, owned: torch.Tensor) -> tuple[float, float]:
        """‖·‖₁ (summed in rank order) and max|·| of an owned buffer over every rank."""
        row = [float(owned.abs().sum()), float(owned.abs().max()) if owned.numel() else 0.0]
        rows = self.comm.allgather_scalars(row)
        return sum_in_rank_order(rows[:, :1])[0], float(rows[:, 1].max())

    def _search(self, closure: Callable[[], torch.Tensor], *, start: LinePoint,
                t_init: float, d_max: float, g_max: float, budget: int
                ) -> tuple[LinePoint, float, int]:
        """The strong-Wolfe search along the gathered direction; leaves θ at the accepted
        point and its gradient in ``_g``. Returns the point, its max|g| and the
        evaluations spent."""
        grad, owned_d = self.grad, self.owned_direction
        last_g_max = kept_g_max = math.nan

        held = self._taking_part.held

        def trial_row() -> list[float]:
            zero_spans_(grad, held)   # idle parameters: no gradient, as at the start
            return [float(torch.dot(grad, owned_d)),
                    float(grad.abs().max()) if grad.numel() else 0.0]

        def evaluate(t: float) -> LinePoint:
            nonlocal last_g_max
            self._set_params(t)
            loss, rows = self._evaluate(closure, trial_row)
            last_g_max = max(float(row[2]) for row in rows)
            return LinePoint(t, loss, sum_in_rank_order(rows)[1])

        def keep() -> None:
            nonlocal kept_g_max
            self._g_kept.copy_(grad)
            kept_g_max = last_g_max

        outcome = strong_wolfe_search(evaluate, start=start, t_init=t_init,
                                      direction_max=d_max, settings=self.wolfe,
                                      max_evals=budget, keep=keep)
        if outcome.source == "last":
            self._g.copy_(grad)
            g_max = last_g_max
        elif outcome.source == "kept":
            self._set_params(outcome.point.t)
            self._g.copy_(self._g_kept)
            g_max = kept_g_max
        else:   # nothing lower than the start: back to it (t = 0)
            self._set_params(0.0)
        return outcome.point, g_max, outcome.evaluations

    # ---- pairs and direction --------------------------------------------------------------
    def _update_pairs(self, iteration: int) -> None:
        """The EMA buffers at the current iterate; every T iterations (from 2T on) a pair
        from their change since the last snapshot (as the stochastic step, on θ and g)."""
        cfg, state = self.config, self.flat_state
        self._read_params()
        part = self._taking_part
        update_emas_(state, param=self.param, grad=self._g, beta_param=cfg.beta_param,
                     beta_grad=cfg.beta_grad, first=iteration == 1, held=part.held,
                     starting=part.starting if iteration > 1 else ())
        if iteration % cfg.update_freq:
            return
        m_param, m_grad = state["m_param"], state["m_grad"]
        if iteration >= 2 * cfg.update_freq:
            # torch's s = t·d (zero when nothing moved since the last pair), or the EMAs'.
            s = (self._last_step.clone() if self._pairs_from_steps
                 else m_param - state["snap_param"])
            y = m_grad - state["snap_grad"]
            rows = self.comm.allgather_scalars(self.curvature.pair_row(s, y))
            self.curvature.offer(s, y, sum_in_rank_order(rows))
            self.counters["accepted_pairs"].fill_(int(self.curvature.accepted))
            self.counters["rejected_pairs"].fill_(int(self.curvature.rejected))
            self.counters["last_gamma"].fill_(float(self.curvature.gamma))
        state["snap_param"].copy_(m_param)
        state["snap_grad"].copy_(m_grad)
        if self._pairs_from_steps:
            self._last_step.zero_()

    def _descent_direction(self) -> float:
        """``d = −H·g`` (``−g`` before the first pair) into the owned direction; returns
        gᵀd (global). A direction that does not descend (H broken by round-off) empties the
        history and falls back to −g."""
        g, curvature = self._g, self.curvature
        curved = curvature.has_curvature
        row = [float(torch.dot(g, g))]
        if curved:
            row += curvature.projection_row(g)
        totals = sum_in_rank_order(self.comm.allgather_scalars(row))
        g_sq = totals[0]
        if curved:
            pairs_part = curvature.descent_direction_(g, totals[1:], self.owned_direction)
            g_dot_d = pairs_part - float(curvature.gamma) * g_sq
            if self._taking_part.held:   # idle parameters do not move (gᵀd: g is 0 there)
                zero_spans_(self.owned_direction, self._taking_part.held)
            if math.isfinite(g_dot_d) and g_dot_d < 0.0:
                return g_dot_d
            logger.warning("the curvature gave no descent direction (gᵀd = %.3g): history "
                           "cleared, steepest descent for this iteration", g_dot_d)
            curvature.reset()
            self.counters["sgd_fallbacks"] += 1
        torch.neg(g, out=self.owned_direction)
        return -g_sq
