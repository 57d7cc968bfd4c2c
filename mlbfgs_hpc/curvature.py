"""Per-block curvature: damping, the pair ring buffer and the inverse-Hessian product.

Pure tensor code with no knowledge of ranks or param groups: :class:`BlockCurvature` holds one
block's history of the last ``m`` accepted pairs and applies the L-BFGS inverse-Hessian
estimate ``H`` to a vector (``DESIGN.md`` §1, steps 4–6).

Ring layout (m = 4, three pairs accepted, ``head`` = next slot to write)::

    slot:   0     1     2     3
    S:    [s₁]  [s₂]  [s₃]  [  ]      count = 3, head = 3
    Y:    [ŷ₁]  [ŷ₂]  [ŷ₃]  [  ]      newest pair = slot (head − 1) mod m

All state is tensors of fixed shape (``S``/``Y`` of ``(m, n)``, ``rho`` of ``(m,)``, 0-d
``gamma``/``head``/``count``), so it serialises with ``torch.save`` and HDF5 alike.

``H·q`` is computed in the **compact form** of Byrd, Nocedal and Schnabel (1994,
"Representations of quasi-Newton matrices and their use in limited memory methods", Math.
Prog. 63), the same operator as the two-loop recursion, rearranged::

    H·q = γ·q + Sᵀ·c_S + Ŷᵀ·c_Y,      [c_S; c_Y] = W · [S·q; Ŷ·q]

    W = | R⁻ᵀ(D + γ·ŶᵀŶ)R⁻¹   −γ·R⁻ᵀ |     R = upper triangle of SᵀŶ (pairs oldest first)
        |      −γ·R⁻¹           0   |     D = its diagonal (sᵢᵀŷᵢ = 1/ρᵢ)

``W`` (2k×2k) depends only on the history, so it is rebuilt in float64 when a pair is
accepted (every ``update_freq`` steps) and whenever the ring is loaded; each step then costs
five BLAS calls per block (two GEMVs out, the tiny ``W`` product, two GEMVs back) instead of
the two-loop's ``6k + 2`` dependent BLAS-1 calls, moving ~2.5× fewer bytes: 1.1–4.3× faster
on the reference CPU (BENCHMARKS.md §3), 2.4–10× on a GPU, where every call is a kernel
launch (§7). :meth:`BlockCurvature.two_loop_` keeps the textbook recursion: the reference
the tests hold the compact form to, and the fall-back for a history whose ``R`` cannot be
inverted in float64.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import MLBFGSConfig

logger = logging.getLogger(__name__)

#: Names of the tensors that make up one block's curvature state, in checkpoint order.
CURVATURE_STATE_KEYS: tuple[str, ...] = (
    "S", "Y", "rho", "gamma", "head", "count", "accepted", "rejected")


@dataclass(frozen=True)
class DampedPair:
    """Outcome of damping a pair: the mixing factor and the dot products the test needs."""

    tau: float
    s_dot_s: float
    s_dot_yhat: float
    yhat_dot_yhat: float

    def accepted(self, curvature_eps: float, *, largest: float = math.inf) -> bool:
        """The curvature test sᵀŷ > ε·sᵀs on finite dot products, and the pair's ρ = 1/sᵀŷ
        and γ = sᵀŷ/ŷᵀŷ no larger than ``largest`` (the ring's dtype's maximum): in a dead
        network s and ŷ are ~1e-20, and a pair that passes the relative test can still have
        a ρ that float32 cannot hold (measured: a CNN at lr 0.2 crashed on storing it)."""
        values = (self.s_dot_s, self.s_dot_yhat, self.yhat_dot_yhat)
        return (all(math.isfinite(v) for v in values)
                and self.s_dot_s > 0.0
                and self.s_dot_yhat > curvature_eps * self.s_dot_s
                and 1.0 / self.s_dot_yhat <= largest
                and self.s_dot_yhat <= largest * self.yhat_dot_yhat)


def damping_factor(mu: float, *, tau0: float, sigma_low: float, sigma_high: float) -> float:
    """τ that keeps μ = sᵀy/sᵀs of the damped pair inside [σL, σH] (DESIGN.md §1.4)."""
    if mu < sigma_low:
        return min((1.0 - sigma_low) / (1.0 - mu), tau0)
    if mu > sigma_high:
        return min((sigma_high - 1.0) / (mu - 1.0), tau0)
    return tau0


def inverse_damping_factor(s_dot_y: float, y_h_y: float, *, mu1: float) -> float:
    """θ of double damping's first stage: s ← θ·s + (1−θ)·H·y gives sᵀy = μ1·yᵀHy when
    sᵀy < μ1·yᵀHy (θ ∈ (0, 1): at least 1 − μ1 when sᵀy ≥ 0); 1 (no change) otherwise or
    when yᵀHy is not > 0."""
    if not (math.isfinite(s_dot_y) and math.isfinite(y_h_y)) or y_h_y <= 0.0:
        return 1.0
    if s_dot_y >= mu1 * y_h_y:
        return 1.0
    return (1.0 - mu1) * y_h_y / (y_h_y - s_dot_y)


def damp_pair_(s: torch.Tensor, y: torch.Tensor, *, config: MLBFGSConfig) -> DampedPair:
    """Overwrite ``y`` with ŷ = τ·y + (1−τ)·s and return τ and the dot products.

    The dots are accumulated in the tensors' dtype and read back as Python floats: this runs
    once every ``update_freq`` steps, so the host synchronisation is negligible.
    """
    s_dot_s = float(torch.dot(s, s))
    s_dot_y = float(torch.dot(s, y))
    mu = s_dot_y / s_dot_s if s_dot_s > 0.0 and math.isfinite(s_dot_s) else math.nan
    if math.isfinite(mu):
        tau = damping_factor(mu, tau0=1.0 - config.damping,
                             sigma_low=config.sigma_low, sigma_high=config.sigma_high)
    else:
        tau = 1.0  # the pair is rejected below; keep y untouched
    if tau != 1.0:
        y.mul_(tau).add_(s, alpha=1.0 - tau)
    return DampedPair(tau=tau, s_dot_s=s_dot_s, s_dot_yhat=float(torch.dot(s, y)),
                      yhat_dot_yhat=float(torch.dot(y, y)))


def compact_middle_matrix(sty: torch.Tensor, yty: torch.Tensor, rho: torch.Tensor,
                          order: Sequence[int], gamma: float) -> torch.Tensor:
    """The middle matrix ``W`` of the compact form, in ring *storage* order (float64, CPU).

    Args:
        sty: ``(r, r)`` Gram matrix ``S·Ŷᵀ`` of the first ``r`` ring slots (entry ``(i, j)`` is
            ``sᵢᵀŷⱼ``), any float dtype.
        yty: ``(r, r)`` Gram matrix ``Ŷ·Ŷᵀ`` of the same slots.
        rho: ``(r,)`` stored ``ρᵢ = 1/(sᵢᵀŷᵢ)``: the diagonal of ``R`` and ``D`` is taken from
            them, exactly the values the two-loop recursion uses.
        order: the slots that hold pairs, newest first (all ``< r``).
        gamma: γ of ``H0 = γI``.

    Returns:
        ``(2r, 2r)`` float64 ``W``; rows/columns ``[0, r)`` pair with ``S``'s slots, ``[r, 2r)``
        with ``Ŷ``'s; those of slots outside ``order`` are zero (so empty slots add nothing).
    """
    r = sty.shape[0]
    k = len(order)
    if k == 0 or len(set(order)) != k or not all(0 <= i < r for i in order):
        raise ValueError(f"order must list 1..{r} distinct slots in [0, {r}), got {order}")
    chrono = torch.tensor(list(reversed(order)))  # oldest first
    sty64 = sty.double().cpu()[chrono][:, chrono]
    yty64 = yty.double().cpu()[chrono][:, chrono]
    diag = 1.0 / rho.double().cpu()[chrono]
    upper = torch.triu(sty64, diagonal=1) + torch.diag(diag)
    eye = torch.eye(k, dtype=torch.float64)
    r_inv = torch.linalg.solve_triangular(upper, eye, upper=True)
    top_left = r_inv.T @ (torch.diag(diag) + gamma * yty64) @ r_inv
    w = torch.zeros(2 * r, 2 * r, dtype=torch.float64)
    rows_s, rows_y = chrono, chrono + r
    w[rows_s.unsqueeze(1), rows_s.unsqueeze(0)] = top_left
    w[rows_s.unsqueeze(1), rows_y.unsqueeze(0)] = -gamma * r_inv.T
    w[rows_y.unsqueeze(1), rows_s.unsqueeze(0)] = -gamma * r_inv
    return w


class BlockCurvature:
    """The curvature history of one block and ``H·q`` on it (compact form; two-loop reference).

    Args:
        numel: number of parameters of the block.
        history_size: ring capacity m.
        dtype: dtype of the history (the parameters' dtype).
        device: device of the history.
        history: ``(S, Y)`` storage to use instead of allocating it: two ``(m, numel)`` views
            (rows may be strided), e.g. this block's columns of the batched history of
            :class:`~mlbfgs_hpc.batched.BatchedCurvature`. ``None``: allocate (zeros).
    """

    def __init__(self, *, numel: int, history_size: int, dtype: torch.dtype,
                 device: torch.device,
                 history: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        if numel < 1:
            raise ValueError(f"numel must be >= 1, got {numel}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        self.numel = numel
        self.history_size = history_size
        kw = {"dtype": dtype, "device": device}
        if history is None:
            history = (torch.zeros(history_size, numel, **kw),
                       torch.zeros(history_size, numel, **kw))
        for name, view in zip("SY", history):
            if tuple(view.shape) != (history_size, numel) or view.dtype != dtype:
                raise ValueError(f"history {name} must be ({history_size}, {numel}) {dtype}, "
                                 f"got {tuple(view.shape)} {view.dtype}")
        self.S, self.Y = history
        self.rho = torch.zeros(history_size, **kw)
        self.gamma = torch.ones((), **kw)
        self.head = torch.zeros((), dtype=torch.int64)
        self.count = torch.zeros((), dtype=torch.int64)
        self.accepted = torch.zeros((), dtype=torch.int64)
        self.rejected = torch.zeros((), dtype=torch.int64)
        #: τ of the last offered pair (NaN before the first): a diagnostic, not state.
        self.last_tau = math.nan
        #: θ of the last double-damping stage (NaN when it did not run): a diagnostic.
        self.last_theta = math.nan
        # Row views and scalar scratch are made once so the per-step recursion allocates
        # no tensor storage (views of existing storage only). The dot products go through
        # ``torch.mv`` on (1, n) row views into (1,) slots: ``torch.dot(..., out=)`` computes
        # into a fresh 0-d tensor and copies it (one allocation per dot, measured with
        # torch.profiler), while ``mv`` writes straight into ``out``.
        self._s_rows = self.S.unbind(0)
        self._y_rows = self.Y.unbind(0)
        self._s_mats = tuple(self.S[i:i + 1] for i in range(history_size))
        self._y_mats = tuple(self.Y[i:i + 1] for i in range(history_size))
        self._rho_items = tuple(self.rho[i:i + 1] for i in range(history_size))
        self._alpha = torch.zeros(history_size, **kw)
        self._alpha_items = tuple(self._alpha[i:i + 1] for i in range(history_size))
        self._beta = torch.zeros(1, **kw)
        self._order: list[int] = []
        # Compact form: W and its in/out vectors, preallocated for the largest ring; the
        # views used per step are cut once per rebuild (see _rebuild_compact).
        self._w_storage = torch.zeros(4 * history_size * history_size, **kw)
        self._proj = torch.zeros(2 * history_size, **kw)     # [S·q; Ŷ·q]
        self._coeff = torch.zeros(2 * history_size, **kw)    # [c_S; c_Y] = W·[S·q; Ŷ·q]
        self._compact: tuple[torch.Tensor, ...] | None = None

    # ---- state --------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in CURVATURE_STATE_KEYS}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for key in CURVATURE_STATE_KEYS:
            target = getattr(self, key)
            value = state[key]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"curvature state {key!r} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(target.shape)}")
            target.copy_(value)
        self._refresh_order()
        self._rebuild_compact()

    @property
    def has_curvature(self) -> bool:
        return bool(self._order)

    @property
    def order(self) -> tuple[int, ...]:
        """The ring slots that hold pairs, newest first."""
        return tuple(self._order)

    def middle_matrix(self) -> torch.Tensor | None:
        """The compact form's ``W`` (``(2r, 2r)``, storage order of the first ``r`` slots, in
        the history's dtype), or ``None`` when there is no pair or ``W`` is not finite (then
        :meth:`apply_inverse_hessian_` runs the two-loop recursion)."""
        return None if self._compact is None else self._compact[4]

    def _refresh_order(self) -> None:
        head, count, m = int(self.head), int(self.count), self.history_size
        # Newest first: the first loop of the recursion runs newest → oldest.
        self._order = [(head - 1 - k) % m for k in range(count)]

    # ---- pairs --------------------------------------------------------------------------
    def offer_pair(self, s: torch.Tensor, y: torch.Tensor, *, config: MLBFGSConfig,
                   scratch: torch.Tensor | None = None) -> bool:
        """Damp ``(s, y)`` (``y`` is overwritten with ŷ) and push it if it passes the test.

        With ``config.double_damping`` > 0 and a history already in the ring, ``s`` is first
        moved towards H·y (overwritten; :func:`inverse_damping_factor`), with ``scratch``
        (a tensor like ``s``) holding H·y.
        """
        if config.double_damping > 0.0 and self.has_curvature:
            self._damp_towards_h_y_(s, y, mu1=config.double_damping,
                                    h_y=torch.empty_like(s) if scratch is None else scratch)
        pair = damp_pair_(s, y, config=config)
        self.last_tau = pair.tau
        largest = torch.finfo(self.rho.dtype).max
        if not pair.accepted(config.curvature_eps, largest=largest):
            self.rejected += 1
            return False
        slot = int(self.head)
        self._s_rows[slot].copy_(s)
        self._y_rows[slot].copy_(y)
        self.rho[slot] = 1.0 / pair.s_dot_yhat
        self.gamma.fill_(pair.s_dot_yhat / pair.yhat_dot_yhat)
        self.head.fill_((slot + 1) % self.history_size)
        self.count.fill_(min(int(self.count) + 1, self.history_size))
        self.accepted += 1
        self._refresh_order()
        self._rebuild_compact()
        return True

    def _damp_towards_h_y_(self, s: torch.Tensor, y: torch.Tensor, *, mu1: float,
                           h_y: torch.Tensor) -> None:
        h_y.copy_(y)
        self.apply_inverse_hessian_(h_y)
        theta = inverse_damping_factor(float(torch.dot(s, y)), float(torch.dot(y, h_y)),
                                       mu1=mu1)
        self.last_theta = theta
        if theta != 1.0:
            s.mul_(theta).add_(h_y, alpha=1.0 - theta)

    def _rebuild_compact(self) -> None:
        """Recompute ``W`` from the ring (a deterministic function of the state tensors, so a
        loaded checkpoint reproduces it bit for bit)."""
        self._compact = None
        if not self._order:
            return
        rows = max(self._order) + 1  # = count until the ring wraps, then m
        s_rows, y_rows = self.S[:rows], self.Y[:rows]
        w = compact_middle_matrix(s_rows @ y_rows.T, y_rows @ y_rows.T, self.rho[:rows],
                                  self._order, float(self.gamma))
        if not bool(torch.isfinite(w).all()):
            # R is numerically singular: the recursion divides by each ρ on its own instead.
            logger.debug("compact form unavailable (R not invertible): two-loop recursion")
            return
        w_view = self._w_storage[:4 * rows * rows].view(2 * rows, 2 * rows)
        w_view.copy_(w)
        proj, coeff = self._proj[:2 * rows], self._coeff[:2 * rows]
        self._compact = (s_rows, y_rows, s_rows.T, y_rows.T, w_view, proj, proj[:rows],
                         proj[rows:], coeff, coeff[:rows], coeff[rows:])

    # ---- direction ----------------------------------------------------------------------
    def apply_inverse_hessian_(self, q: torch.Tensor) -> torch.Tensor:
        """In place ``q ← H·q`` with H0 = γ·I (needs a pair), by the compact form.

        Five BLAS calls over the whole block, whatever the history length: no loop over
        parameter tensors or pairs, no allocation.
        """
        if self._compact is None:
            return self.two_loop_(q)
        s_rows, y_rows, s_cols, y_cols, w, proj, proj_s, proj_y, coeff, c_s, c_y = self._compact
        torch.mv(s_rows, q, out=proj_s)
        torch.mv(y_rows, q, out=proj_y)
        torch.mv(w, proj, out=coeff)
        q.mul_(self.gamma)
        q.addmv_(s_cols, c_s)
        q.addmv_(y_cols, c_y)
        return q

    def two_loop_(self, q: torch.Tensor) -> torch.Tensor:
        """In place ``q ← H·q`` by the textbook two-loop recursion (the reference).

        One Python iteration per stored pair (m ≤ a few dozen), each a fused BLAS-1 call over
        the whole block: no loop over parameter tensors, no allocation.
        """
        alpha, beta = self._alpha_items, self._beta
        for i in self._order:                       # newest → oldest
            torch.mv(self._s_mats[i], q, out=alpha[i])
            alpha[i].mul_(self._rho_items[i])
            q.addcmul_(self._y_rows[i], alpha[i], value=-1.0)
        q.mul_(self.gamma)
        for i in reversed(self._order):             # oldest → newest
            torch.mv(self._y_mats[i], q, out=beta)
            beta.mul_(self._rho_items[i]).neg_().add_(alpha[i])   # αᵢ − βᵢ
            q.addcmul_(self._s_rows[i], beta)
        return q
