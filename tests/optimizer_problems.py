"""Small problems shared by the optimizer tests (``test_optimizer*.py``): a quadratic over
parameter tensors with seeded gradient noise, and a tiny tanh MLP with fixed batches and the
optimizer/scheduler pair the checkpoint tests train it with."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim import lr_scheduler

from mlbfgs_hpc import MLBFGS, build_blocks

F64 = torch.float64


# ---- problems -----------------------------------------------------------------------------
def spd_matrix(n: int, low: float, high: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.linspace(low, high, n)) @ q.T


class Quadratic:
    """f(θ) = ½ θᵀAθ − bᵀθ over a flat vector split into parameter tensors.

    ``noise`` > 0 adds a fixed, seeded perturbation per step to the gradient (the same for
    the optimizer and the reference), which makes pairs noisy enough to exercise damping.
    """

    def __init__(self, sizes: Sequence[int], *, low: float, high: float, seed: int,
                 noise: float = 0.0, coupled: bool = True) -> None:
        n = sum(sizes)
        rng = np.random.default_rng(seed + 1)
        self.sizes = list(sizes)
        if coupled:
            self.a = spd_matrix(n, low, high, seed)
        else:  # block-diagonal: the blocks are independent problems
            self.a = np.zeros((n, n))
            for i, sl in enumerate(self.slices()):
                self.a[sl, sl] = spd_matrix(sl.stop - sl.start, low, high, seed + 10 * i)
        self.b = rng.standard_normal(n)
        self.theta0 = rng.standard_normal(n)
        self.noise = noise
        self._noise_rng = np.random.default_rng(seed + 2)
        self._noise_cache: list[np.ndarray] = []

    def grad(self, theta: np.ndarray, call: int) -> np.ndarray:
        g = self.a @ theta - self.b
        if self.noise:
            while len(self._noise_cache) <= call:
                self._noise_cache.append(self._noise_rng.standard_normal(len(theta)))
            g = g + self.noise * self._noise_cache[call]
        return g

    def params(self) -> list[nn.Parameter]:
        chunks = np.split(self.theta0, np.cumsum(self.sizes)[:-1])
        return [nn.Parameter(torch.tensor(c, dtype=F64)) for c in chunks]

    def slices(self) -> list[slice]:
        edges = np.concatenate([[0], np.cumsum(self.sizes)])
        return [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def flat(params: Sequence[torch.Tensor]) -> np.ndarray:
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().copy()


def set_grads(params: Sequence[torch.Tensor], g: np.ndarray) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = torch.tensor(g[offset:offset + n], dtype=p.dtype).view_as(p)
        offset += n


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(123)
    return [(torch.randn(16, 5, generator=gen), torch.randn(16, 3, generator=gen))
            for _ in range(count)]


def train(model: nn.Module, opt: MLBFGS, sched: Any,
          data: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()


def make_opt(model: nn.Module) -> tuple[MLBFGS, Any]:
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, weight_decay=1e-3,
                 history_size=3, update_freq=2, kl_clip=0.05)
    return opt, lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
