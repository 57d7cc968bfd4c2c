"""The step's elementwise pieces (mlbfgs_hpc/flatops.py): hand-computed small cases."""

from __future__ import annotations

import math

import pytest
import torch

from mlbfgs_hpc.flatops import CLIP_EPS, all_finite, clip_factor, gradient_row, heavy_ball_


@pytest.mark.parametrize(("values", "finite"), [
    ([1.0, -2.0, 3.0], True),
    ([1.0, math.nan, 3.0], False),
    ([-math.inf, 0.0], False),
    ([3e38, 3e38, 3e38], True),     # the float32 sum overflows, every entry is finite
])
def test_all_finite(values: list[float], finite: bool) -> None:
    assert all_finite(torch.tensor(values, dtype=torch.float32)) is finite


def test_gradient_row_flags_and_measures() -> None:
    g = torch.tensor([3.0, 4.0])
    assert gradient_row(g, measure_norm=False) == [0.0]
    assert gradient_row(g, measure_norm=True) == [0.0, 25.0]
    assert gradient_row(torch.tensor([math.nan, 1.0]), measure_norm=True)[0] == 1.0
    big = torch.full((4,), 3e30)      # ‖g‖² overflows float32; the entries are finite
    flag, sq = gradient_row(big, measure_norm=True)
    assert flag == 0.0 and sq == math.inf


def test_clip_factor_is_clip_grad_norm_s() -> None:
    assert clip_factor(25.0, 10.0) == 1.0                      # ‖g‖ = 5 ≤ 10: untouched
    assert clip_factor(25.0, 1.0) == pytest.approx(1.0 / (5.0 + CLIP_EPS), rel=1e-15)
    assert clip_factor(math.inf, 1.0) == 0.0                  # an overflowed norm
    g = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    g.grad = g.detach().clone()
    torch.nn.utils.clip_grad_norm_([g], 1.0)
    torch.testing.assert_close(g.grad, torch.tensor([3.0, 4.0], dtype=torch.float64)
                               * clip_factor(25.0, 1.0), rtol=1e-15, atol=0)


@pytest.mark.parametrize("nesterov", [False, True])
def test_heavy_ball_is_sgd_momentum(nesterov: bool) -> None:
    buf, d = torch.zeros(2), torch.tensor([1.0, 2.0])
    assert heavy_ball_(buf, d.clone(), 0.0, nesterov=nesterov, first=True).tolist() == [1, 2]
    assert buf.tolist() == [0.0, 0.0]                          # μ = 0: the buffer waits
    out = heavy_ball_(buf, d.clone(), 0.5, nesterov=nesterov, first=True)
    assert buf.tolist() == [1.0, 2.0]
    assert out.tolist() == ([1.5, 3.0] if nesterov else [1.0, 2.0])
    out = heavy_ball_(buf, torch.tensor([2.0, 0.0]), 0.5, nesterov=nesterov, first=False)
    assert buf.tolist() == [2.5, 1.0]                          # 0.5·[1, 2] + [2, 0]
    assert out.tolist() == ([3.25, 0.5] if nesterov else [2.5, 1.0])
