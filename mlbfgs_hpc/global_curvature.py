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
  two-loop recursion run on coefficients (:meth:`GlobalCurvature.descent_direction_`).

The two-loop recursion's vectors all lie in the span of g, the s's and the ŷ's, and every dot
product it takes is a Gram entry or a projection of g. Written on coefficients, with the
pairs in chronological order, ``R = triu(SᵀŶ)`` (diagonal ``D``: the sᵢᵀŷᵢ)::

    first loop (newest → oldest):   R·α = S·g                      (back substitution)
    q = g − Ŷᵀα,  r = γ·q
    second loop (oldest → newest):  Rᵀ·c = D·α − γ·(Ŷ·g − ŶŶᵀ·α)    (forward substitution)
    H·g = γ·g − γ·Ŷᵀα + Sᵀc,        gᵀH·g = γ·gᵀg − γ·αᵀ(Ŷ·g) + cᵀ(S·g)

so each direction costs two triangular solves of m × m in float64 and two GEMVs over the
owned columns, the same operator as the two-loop recursion (and the compact form of Byrd,
Nocedal and Schnabel 1994), with no m × m inverse formed. The Gram matrices are kept, not
recomputed: a checkpoint stores them, so a resumed run solves with the very same numbers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .curvature import damping_factor

logger = logging.getLogger(__name__)

#: torch.optim.LBFGS's acceptance rule, sᵀy > 1e-10 (absolute), which the line-searched mode
#: applies on top of the relative test.
MIN_CURVATURE = 1e-10
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
        min_curvature: a pair is also rejected unless sᵀŷ > this (absolute). The line-searched
            mode passes :data:`MIN_CURVATURE`, ``torch.optim.LBFGS``'s rule: near a float32
            optimum s and y are round-off, and keeping the older pairs keeps H usable.
        damping: 1 − τ0 (0: none).
        sigma_low: lower bound of the curvature ratio μ = sᵀy/sᵀs (0 with ``sigma_high`` =
            inf: no window).
        sigma_high: upper bound of μ.

    Raises:
        ValueError: ``numel`` < 0 or ``history_size`` < 1.
    """

    def __init__(self, *, numel: int, history_size: int, dtype: torch.dtype,
                 device: torch.device, curvature_eps: float, min_curvature: float = 0.0,
                 damping: float = 0.0,
                 sigma_low: float = 0.0, sigma_high: float = math.inf) -> None:
        if numel < 0:
            raise ValueError(f"numel must be >= 0, got {numel}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        m = history_size
        self.history_size = m
        self.curvature_eps, self.damping = curvature_eps, damping
        self.min_curvature = min_curvature
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
        self._s_dots = torch.zeros(2 * m, **kw)   # [S; Ŷ]·s of a new pair
        self._y_dots = torch.zeros(2 * m, **kw)   # [S; Ŷ]·y
        self._order: list[int] = []
        # The slots in chronological order and, in that order, R = triu(SᵀŶ) and ŶŶᵀ
        # (float64), refreshed when the ring changes.
        self._chrono = np.zeros(0, dtype=np.int64)
        self._r = torch.zeros(0, 0, dtype=torch.float64)
        self._yy = np.zeros((0, 0), dtype=np.float64)

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
        return [self.history, self.gram_sy, self.gram_yy, self._proj, self._s_dots,
                self._y_dots]

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
        # Two GEMVs (faster than one GEMM with two columns, measured on the CPU).
        torch.mv(self.history, s, out=self._s_dots)
        torch.mv(self.history, y, out=self._y_dots)
        m = self.history_size
        own = torch.stack((torch.dot(s, s), torch.dot(s, y), torch.dot(y, y)))
        s_dots, y_dots = self._s_dots.tolist(), self._y_dots.tolist()
        return [*s_dots[:m], *y_dots[:m], *s_dots[m:], *y_dots[m:], *own.tolist()]

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
                and s_yhat > self.min_curvature
                and 1.0 / s_yhat <= largest and s_yhat <= largest * yhat_yhat):
            self.rejected += 1
            return False
        if tau != 1.0:
            y.mul_(tau).add_(s, alpha=1.0 - tau)
        slot = int(self.head)
        # Small float64 arithmetic in numpy on views of the Gram tensors (torch's per-call
        # overhead is ~10x numpy's at this size, and this runs every iteration).
        dots = np.asarray(totals[:4 * m], dtype=np.float64).reshape(4, m)
        old = np.array([i for i in self._order if i != slot], dtype=np.int64)
        if old.size:   # the other slots' products with the new pair (ŷ = τ·y + (1−τ)·s)
            s_yhat_col = tau * dots[1, old] + (1.0 - tau) * dots[0, old]    # sᵢᵀŷ
            y_yhat = tau * dots[3, old] + (1.0 - tau) * dots[2, old]        # ŷᵢᵀŷ
            sy, yy = self.gram_sy.numpy(), self.gram_yy.numpy()
            sy[old, slot] = s_yhat_col
            sy[slot, old] = dots[2, old]                                    # sᵀŷᵢ
            yy[old, slot] = y_yhat
            yy[slot, old] = y_yhat
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
        """The slot order and, in chronological order, ``R`` and ``ŶŶᵀ`` from the ring's
        state (deterministic: a loaded checkpoint gives the same)."""
        head, count, m = int(self.head), int(self.count), self.history_size
        self._order = [(head - 1 - k) % m for k in range(count)]
        self._chrono = np.array(self._order[::-1], dtype=np.int64)
        window = np.ix_(self._chrono, self._chrono)
        self._r = torch.from_numpy(np.triu(self.gram_sy.numpy()[window]))
        self._yy = self.gram_yy.numpy()[window]

    # ---- the direction --------------------------------------------------------------------
    def projection_row(self, g: torch.Tensor) -> list[float]:
        """This rank's share of ``[S·g; Ŷ·g]`` (2m values; empty slots give 0 or stale
        values that ``W`` ignores)."""
        torch.mv(self.history, g, out=self._proj)
        return self._proj.tolist()

    def descent_direction_(self, g: torch.Tensor, projection: Sequence[float],
                           out: torch.Tensor) -> float:
        """``out ← −H·g`` on the owned columns, from the rank-summed :meth:`projection_row`
        (the two-loop recursion on coefficients, see the module docstring).

        Returns:
            The pairs' part of gᵀd, ``γ·αᵀ(Ŷ·g) − cᵀ(S·g)``: gᵀd is this minus γ·gᵀg, so the
            caller gets gᵀd from the global gᵀg without another reduction. Not finite when
            the history is numerically broken (the caller then falls back to −g).
        """
        if not self._order:
            raise RuntimeError("descent_direction_ needs a pair in the ring")
        m, chrono = self.history_size, self._chrono
        proj = np.asarray(projection[:2 * m], dtype=np.float64)
        s_g, y_g = proj[:m][chrono], proj[m:][chrono]
        gamma = float(self.gamma)
        r = self._r
        alpha = torch.linalg.solve_triangular(
            r, torch.from_numpy(s_g).unsqueeze(1), upper=True).squeeze(1).numpy()
        rhs = np.diagonal(r.numpy()) * alpha - gamma * (y_g - self._yy @ alpha)
        c = torch.linalg.solve_triangular(
            r.T, torch.from_numpy(rhs).unsqueeze(1), upper=False).squeeze(1).numpy()
        # d = −(γ·g − γ·Ŷᵀα + Sᵀc): one GEMV over [S; Ŷ] with the coefficients put back
        # into storage order (empty slots: 0).
        coeff = np.zeros(2 * m, dtype=np.float64)
        coeff[chrono] = -c
        coeff[chrono + m] = gamma * alpha
        torch.mul(g, -gamma, out=out)
        out.addmv_(self.history.T, torch.from_numpy(coeff).to(out.dtype))
        return gamma * float(alpha @ y_g) - float(c @ s_g)
