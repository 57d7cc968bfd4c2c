"""Independent references for :class:`mlbfgs_hpc.MLBFGS`, written in numpy and sharing no code
with the package:

* textbook L-BFGS (Nocedal & Wright, Alg. 7.4/7.5, H0 = γI), independently per block;
* a dense transcription of DESIGN.md §1 (EMA buffers, snapshots, damping, acceptance, dense
  BFGS inverse Hessian per block, the κ guard, grafting, outer momentum, per-group lr/wd);
* :func:`run_in_lockstep`, which steps the optimizer and a reference on the same gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import nn

from mlbfgs_hpc import MLBFGS
from tests.optimizer_problems import Quadratic, flat, set_grads


# ---- oracle 1: textbook L-BFGS --------------------------------------------------------------
def textbook_lbfgs(problem: Quadratic, *, steps: int, lr: float, m: int) -> list[np.ndarray]:
    """L-BFGS with fixed step ``lr``, independently per block, pairs from consecutive iterates."""
    x = problem.theta0.copy()
    xs = [x.copy()]
    history: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in problem.slices()]
    x_prev = g_prev = None
    for k in range(steps):
        g = problem.grad(x, k)
        d = g.copy()
        for b, sl in enumerate(problem.slices()):
            if x_prev is not None:
                history[b].append((x[sl] - x_prev[sl], g[sl] - g_prev[sl]))
                del history[b][:-m]
            if history[b]:
                d[sl] = textbook_two_loop(history[b], g[sl])
        x_prev, g_prev = x.copy(), g
        x = x - lr * d
        xs.append(x.copy())
    return xs


def textbook_two_loop(pairs: list[tuple[np.ndarray, np.ndarray]],
                      g: np.ndarray) -> np.ndarray:
    """H·g by the two-loop recursion, H0 = γI from the newest pair (Nocedal & Wright,
    Alg. 7.4)."""
    q = g.copy()
    alphas = []
    for s, y in reversed(pairs):
        a = (s @ q) / (s @ y)
        alphas.append(a)
        q -= a * y
    s, y = pairs[-1]
    r = (s @ y) / (y @ y) * q
    for (s, y), a in zip(pairs, reversed(alphas)):
        r += s * (a - (y @ r) / (s @ y))
    return r


# ---- oracle 2: dense mL-BFGS (DESIGN.md §1) -------------------------------------------------
class DenseReference:
    """DESIGN.md §1 in plain numpy with a dense inverse Hessian per block."""

    def __init__(self, *, slices: list[slice], lr: np.ndarray, wd: np.ndarray, m: int, T: int,
                 beta_param: float, beta_grad: float, damping: float, sigma_low: float,
                 sigma_high: float, eps: float, clip: str, kappa: float, momentum: float,
                 nesterov: bool, double_damping: float = 0.0) -> None:
        self.slices, self.lr, self.wd, self.m, self.T = slices, lr, wd, m, T
        self.bp, self.bg, self.tau0 = beta_param, beta_grad, 1.0 - damping
        self.sl, self.sh, self.eps = sigma_low, sigma_high, eps
        self.clip, self.kappa, self.mom, self.nesterov = clip, kappa, momentum, nesterov
        self.mu1 = double_damping
        self.moved_towards_h_y = 0   # pairs whose s double damping changed
        self.t = 0
        self.history: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in slices]
        self.accepted = self.rejected = self.fallbacks = 0
        self.nu = 1.0
        self.last_direction = np.zeros(0)

    def step(self, theta: np.ndarray, grad: np.ndarray) -> np.ndarray:
        self.t += 1
        g = grad + self.wd * theta
        if self.t == 1:
            self.mp, self.mg = theta.copy(), g.copy()
        else:
            self.mp = self.bp * self.mp + (1 - self.bp) * theta
            self.mg = self.bg * self.mg + (1 - self.bg) * g
        if self.t % self.T == 0:
            if self.t >= 2 * self.T:
                for b, sl in enumerate(self.slices):
                    self._offer(b, self.mp[sl] - self.pp[sl], self.mg[sl] - self.pg[sl])
            self.pp, self.pg = self.mp.copy(), self.mg.copy()
        d = g.copy()
        self.cosines = []
        for b, sl in enumerate(self.slices):
            if self.history[b]:
                d[sl] = self._dense_h(b) @ g[sl]
                self.cosines.append(float(g[sl] @ d[sl]) / float(
                    np.linalg.norm(g[sl]) * np.linalg.norm(d[sl])))
        self.nu = 1.0
        if any(self.history):
            gd = float(g @ d)
            if not math.isfinite(gd) or gd <= 0:
                d = g.copy()
                self.fallbacks += 1
            elif self.clip == "kl":
                self.nu = min(1.0, math.sqrt(self.kappa / gd))
                d = self.nu * d
            elif self.clip == "graft":  # each curved block's H·g at its gradient's norm
                for b, sl in enumerate(self.slices):
                    if self.history[b]:
                        d[sl] *= np.linalg.norm(g[sl]) / np.linalg.norm(d[sl])
            elif self.clip == "graft-global":  # the whole direction at the whole g's norm
                d *= np.linalg.norm(g) / np.linalg.norm(d)
        self.last_direction, self.last_gradient = d, g
        if self.mom == 0:
            v = d
        else:
            self.buf = d.copy() if self.t == 1 else self.mom * self.buf + d
            v = d + self.mom * self.buf if self.nesterov else self.buf
        return theta - self.lr * v

    def _offer(self, b: int, s: np.ndarray, y: np.ndarray) -> None:
        if self.mu1 > 0 and self.history[b]:
            # Double damping's first stage, with the block's dense H: s moves towards H·y
            # until sᵀy = μ1·yᵀHy (Goldfarb, Ren and Bahamou 2020).
            h_y = self._dense_h(b) @ y
            sy, yhy = float(s @ y), float(y @ h_y)
            if yhy > 0 and sy < self.mu1 * yhy:
                theta = (1 - self.mu1) * yhy / (yhy - sy)
                s = theta * s + (1 - theta) * h_y
                self.moved_towards_h_y += 1
        ss, sy = float(s @ s), float(s @ y)
        mu = sy / ss if ss > 0 else math.nan
        if mu < self.sl:
            tau = min((1 - self.sl) / (1 - mu), self.tau0)
        elif mu > self.sh:
            tau = min((self.sh - 1) / (mu - 1), self.tau0)
        else:
            tau = self.tau0
        yhat = tau * y + (1 - tau) * s if math.isfinite(mu) else y
        syh = float(s @ yhat)
        if np.isfinite([ss, syh, float(yhat @ yhat)]).all() and ss > 0 and syh > self.eps * ss:
            self.history[b].append((s.copy(), yhat))
            del self.history[b][:-self.m]
            self.accepted += 1
        else:
            self.rejected += 1

    def _dense_h(self, b: int) -> np.ndarray:
        pairs = self.history[b]
        s, y = pairs[-1]
        n = len(s)
        h = (s @ y) / (y @ y) * np.eye(n)
        for s, y in pairs:
            rho = 1.0 / (s @ y)
            v = np.eye(n) - rho * np.outer(y, s)
            h = v.T @ h @ v + rho * np.outer(s, s)
        return h


def run_in_lockstep(problem: Quadratic, params: list[nn.Parameter], opt: MLBFGS,
                    ref: DenseReference, *, steps: int, check: Callable[[int], None]) -> None:
    """Step the optimizer and the reference on the same gradients; parameters must agree
    after every step, then ``check(step)`` compares whatever else the test is about."""
    theta = problem.theta0.copy()
    for k in range(steps):
        g = problem.grad(theta, k)
        set_grads(params, g)
        opt.step()
        theta = ref.step(theta, g)
        np.testing.assert_allclose(flat(params), theta, rtol=1e-8, atol=1e-10,
                                   err_msg=f"after step {k + 1}")
        check(k)
