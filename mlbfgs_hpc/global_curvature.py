"""One L-BFGS history over the whole parameter vector, its columns split over the owners.

The line-searched mode (:mod:`mlbfgs_hpc.searched`) approximates the *full* inverse Hessian,
not a block-diagonal one: with exact gradients the coupling between layers is what makes
L-BFGS fast (block-diagonal curvature broke down early in a third of the runs measured on
the full-batch MLP, BENCHMARKS.md). The history is still stored by the ranks that own the
blocks, so it costs each rank 2·m·n/p floats::

    flat vector:  | block 0 | block 1 | block 2 | block 3 |
    owner:        | rank 0            | rank 1            |
    S, Ŷ rows:    | s₁ … sₘ columns   | s₁ … sₘ columns   |   (m, n_r) on each rank
    every rank:   Gram matrices SᵀŶ, ŶᵀŶ (m × m, float64), γ, ring head/count: identical

Every product with the history is a sum over ranks of the owned columns' share, which the
caller reduces (one allgather of a few dozen floats, summed in rank order) and passes back,
so every rank holds the same float64 scalars and builds the same ``W``:

* a new pair: this rank's ``[S·s, S·y, Ŷ·s, Ŷ·y]`` and ``sᵀs, sᵀy, yᵀy``
  (:meth:`GlobalCurvature.pair_row`) → the damping, the acceptance test, a new row and column
  of both Gram matrices (:meth:`GlobalCurvature.offer`);
* a direction: this rank's ``[S·g; Ŷ·g]`` (:meth:`GlobalCurvature.projection_row`) → the
  compact form (Byrd, Nocedal and Schnabel 1994) ``H·g = γ·g + [S; Ŷ]ᵀ·W·[S·g; Ŷ·g]`` on the
  owned columns (:meth:`GlobalCurvature.descent_direction_`).

The Gram matrices are kept, not recomputed: a checkpoint stores them, so a resumed run builds
``W`` from the very same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch

from .curvature import compact_middle_matrix, damping_factor

logger = logging.getLogger(__name__)

#: Keys of :meth:`GlobalCurvature.global_state` (identical on every rank).
GLOBAL_CURVATURE_KEYS: tuple[str, ...] = (
    "gram_sy", "gram_yy", "gamma", "head", "count", "accepted", "rejected")


class GlobalCurvature:
    """The history ring of the whole vector, for the columns this rank owns.

    Args:
        numel: elements this rank owns (may be 0: a rank without blocks).
        history_size: ring capacity m.
        dtype: dtype of the stored pairs (the parameters').
        device: device of the stored pairs.
        curvature_eps: acceptance threshold ε of sᵀŷ > ε·sᵀs.
        damping: 1 − τ0 (0: none).
        sigma_low: lower bound of the curvature ratio μ = sᵀy/sᵀs (0 with ``sigma_high`` =
            inf: no window).
        sigma_high: upper bound of μ.

    Raises:
        ValueError: ``numel`` < 0 or ``history_size`` < 1.
    """

    def __init__(self, *, numel: int, history_size: int, dtype: torch.dtype,
                 device: torch.device, curvature_eps: float, damping: float = 0.0,
                 sigma_low: float = 0.0, sigma_high: float = math.inf) -> None:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        m = history_size
        self.history_size = m
        self.curvature_eps, self.damping = curvature_eps, damping
        self.sigma_low, self.sigma_high = sigma_low, sigma_high
        kw = {"dtype": dtype, "device": device}
        #: Rows 0..m-1: S's slots; rows m..2m-1: Ŷ's slots (owned columns).
        self.history = torch.zeros(2 * m, numel, **kw)
        self.S, self.Y = self.history[:m], self.history[m:]
        f64 = {"dtype": torch.float64}
        self.gram_sy = torch.zeros(m, m, **f64)   # (i, j): sᵢᵀŷⱼ over the whole vector
        self.gram_yy = torch.zeros(m, m, **f64)   # (i, j): ŷᵢᵀŷⱼ
        self.gamma = torch.ones((), **f64)
        self.head = torch.zeros((), dtype=torch.int64)
        self.count = torch.zeros((), dtype=torch.int64)
        self.accepted = torch.zeros((), dtype=torch.int64)
        self.rejected = torch.zeros((), dtype=torch.int64)
        self._proj = torch.zeros(2 * m, **kw)
        self._pair_dots = torch.zeros(2 * m, 2, **kw)
        self._order: list[int] = []
        self._w: torch.Tensor | None = None   # (2r, 2r) float64, r = slots in use

    # ---- read-outs ------------------------------------------------------------------------
    @property
    def has_curvature(self) -> bool:
        return bool(self._order)

    @property
    def order(self) -> tuple[int, ...]:
        """The ring slots that hold pairs, newest first."""
        return tuple(self._order)

    def global_state(self) -> dict[str, torch.Tensor]:
        """The ring's scalars and Gram matrices (the same on every rank; the live tensors)."""
        return {key: getattr(self, key) for key in GLOBAL_CURVATURE_KEYS}

    def block_state(self, columns: slice) -> dict[str, torch.Tensor]:
        """One block's share in the per-block checkpoint format: its S and Ŷ columns, and
        copies of the ring's ρ, γ, head, count and counters (the same for every block)."""
        m = self.history_size
        diag = torch.diagonal(self.gram_sy)
        rho = torch.where(torch.arange(m) < int(self.count), 1.0 / diag, torch.zeros(m))
        dtype = self.history.dtype
        return {"S": self.S[:, columns], "Y": self.Y[:, columns],
                "rho": rho.to(dtype), "gamma": self.gamma.to(dtype),
                "head": self.head.clone(), "count": self.count.clone(),
                "accepted": self.accepted.clone(), "rejected": self.rejected.clone()}

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        return [self.history, self.gram_sy, self.gram_yy, self._proj, self._pair_dots]

    # ---- state ----------------------------------------------------------------------------
    def load(self, global_state: Mapping[str, torch.Tensor],
             columns: Sequence[tuple[slice, Mapping[str, torch.Tensor]]]) -> None:
        """Load the ring's scalars and Gram matrices and, per owned block slice, its S and Ŷ
        columns (the format of :meth:`block_state`).

        Raises:
            ValueError: a tensor of the wrong shape (another history size).
        """
        for key in GLOBAL_CURVATURE_KEYS:
            target, value = getattr(self, key), global_state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"line-search state {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(value)
        for sl, block in columns:
            self.S[:, sl].copy_(block["S"])
            self.Y[:, sl].copy_(block["Y"])
        self._refresh()

    def reset(self) -> None:
        """Forget every pair (the counters stay)."""
        self.head.zero_()
        self.count.zero_()
        self.gamma.fill_(1.0)
        self._refresh()

    # ---- pairs ----------------------------------------------------------------------------
    def pair_row(self, s: torch.Tensor, y: torch.Tensor) -> list[float]:
        """This rank's share of every product a new pair needs: ``[S·s, S·y, Ŷ·s, Ŷ·y]``
        (4m values, slot order) and ``sᵀs, sᵀy, yᵀy``."""
        pair = torch.stack((s, y), dim=1)                      # (n, 2)
        torch.mm(self.history, pair, out=self._pair_dots)      # (2m, 2)
        m = self.history_size
        dots = self._pair_dots
        own = torch.stack((torch.dot(s, s), torch.dot(s, y), torch.dot(y, y)))
        return [*dots[:m, 0].tolist(), *dots[:m, 1].tolist(), *dots[m:, 0].tolist(),
                *dots[m:, 1].tolist(), *own.tolist()]

    def offer(self, s: torch.Tensor, y: torch.Tensor, totals: Sequence[float]) -> bool:
        """Damp ``y`` (overwritten with ŷ) and push the pair if it passes the test.

        Args:
            s, y: this rank's columns of the pair.
            totals: :meth:`pair_row` summed over every rank (in rank order).

        Returns:
            Whether the pair was accepted (the same on every rank).
        """
        m = self.history_size
        s_s, s_y, y_y_dots = totals[4 * m], totals[4 * m + 1], totals[4 * m + 2]
        mu = s_y / s_s if s_s > 0.0 and math.isfinite(s_s) and math.isfinite(s_y) else math.nan
        tau = 1.0
        if math.isfinite(mu):
            tau = damping_factor(mu, tau0=1.0 - self.damping, sigma_low=self.sigma_low,
                                 sigma_high=self.sigma_high)
        s_yhat = tau * s_y + (1.0 - tau) * s_s
        yhat_yhat = tau * tau * y_y_dots + 2.0 * tau * (1.0 - tau) * s_y + \
            (1.0 - tau) ** 2 * s_s
        largest = torch.finfo(self.history.dtype).max
        finite = all(math.isfinite(v) for v in (s_s, s_yhat, yhat_yhat))
        if not (finite and s_s > 0.0 and s_yhat > self.curvature_eps * s_s
                and 1.0 / s_yhat <= largest and s_yhat <= largest * yhat_yhat):
            self.rejected += 1
            return False
        if tau != 1.0:
            y.mul_(tau).add_(s, alpha=1.0 - tau)
        slot = int(self.head)
        s_dot = torch.tensor(totals[0:2 * m], dtype=torch.float64).view(2, m)     # S·s, S·y
        y_dot = torch.tensor(totals[2 * m:4 * m], dtype=torch.float64).view(2, m)  # Ŷ·s, Ŷ·y
        old = torch.tensor([i for i in self._order if i != slot], dtype=torch.long)
        if len(old):   # the other slots' products with the new pair (ŷ = τ·y + (1−τ)·s)
            s_yhat_col = tau * s_dot[1] + (1.0 - tau) * s_dot[0]    # sᵢᵀŷ
            y_yhat = tau * y_dot[1] + (1.0 - tau) * y_dot[0]        # ŷᵢᵀŷ
            self.gram_sy[old, slot] = s_yhat_col[old]
            self.gram_sy[slot, old] = y_dot[0][old]                 # sᵀŷᵢ
            self.gram_yy[old, slot] = y_yhat[old]
            self.gram_yy[slot, old] = y_yhat[old]
        self.gram_sy[slot, slot] = s_yhat
        self.gram_yy[slot, slot] = yhat_yhat
        self.S[slot].copy_(s)
        self.Y[slot].copy_(y)
        self.gamma.fill_(s_yhat / yhat_yhat)
        self.head.fill_((slot + 1) % m)
        self.count.fill_(min(int(self.count) + 1, m))
        self.accepted += 1
        self._refresh()
        return True

    def _refresh(self) -> None:
        """Recompute the slot order and ``W`` from the ring's state (deterministic: a loaded
        checkpoint rebuilds the same ``W``). A ``W`` that is not finite empties the ring."""
        head, count, m = int(self.head), int(self.count), self.history_size
        self._order = [(head - 1 - k) % m for k in range(count)]
        self._w = None
        if not self._order:
            return
        rows = max(self._order) + 1
        sy = self.gram_sy[:rows, :rows]
        w = compact_middle_matrix(sy, self.gram_yy[:rows, :rows], 1.0 / torch.diagonal(sy),
                                  self._order, float(self.gamma))
        if not bool(torch.isfinite(w).all()):
            logger.warning("curvature history numerically singular: starting a new one")
            self.head.zero_()
            self.count.zero_()
            self.gamma.fill_(1.0)
            self._order = []
            return
        self._w = w

    # ---- the direction --------------------------------------------------------------------
    def projection_row(self, g: torch.Tensor) -> list[float]:
        """This rank's share of ``[S·g; Ŷ·g]`` (2m values; empty slots give 0 or stale
        values that ``W`` ignores)."""
        torch.mv(self.history, g, out=self._proj)
        return self._proj.tolist()

    def descent_direction_(self, g: torch.Tensor, projection: Sequence[float],
                           out: torch.Tensor) -> float:
        """``out ← −H·g`` on the owned columns, from the rank-summed :meth:`projection_row`.

        Returns:
            The pairs' part of gᵀd, ``−[S·g; Ŷ·g]ᵀ·W·[S·g; Ŷ·g]``: gᵀd is this minus γ·gᵀg,
            so the caller gets gᵀd from the global gᵀg without another reduction.
        """
        if self._w is None:
            raise RuntimeError("descent_direction_ needs a pair in the ring")
        m, rows = self.history_size, self._w.shape[0] // 2
        proj = torch.tensor([*projection[:rows], *projection[m:m + rows]], dtype=torch.float64)
        coeff = self._w @ proj
        gamma = float(self.gamma)
        c = coeff.to(dtype=out.dtype, device=out.device)
        torch.mul(g, -gamma, out=out)
        out.addmv_(self.S[:rows].T, c[:rows], alpha=-1.0)
        out.addmv_(self.Y[:rows].T, c[rows:], alpha=-1.0)
        return -float(proj @ coeff)
