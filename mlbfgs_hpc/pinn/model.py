"""The PINN network: a tanh MLP that sees the domain box mapped onto [-1, 1]^d."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class PinnMLP(nn.Module):
    """Fully connected tanh network with one output, Raissi et al.'s PINN convention.

    Inputs in the box ``[lower, upper]`` are mapped affinely onto ``[-1, 1]^d`` by fixed
    (untrained, non-persistent) buffers before the first layer, so every coordinate reaches the
    tanh layers at unit scale whatever the box. Weights are Xavier/Glorot-normal, biases zero;
    the initialisation draws from torch's global generator only, so it is fixed by the seed.

    Args:
        input_dim: number of input coordinates (>= 1).
        width: neurons per hidden layer (>= 1).
        depth: number of hidden layers (>= 1).
        lower: lower corner of the domain box, ``input_dim`` numbers.
        upper: upper corner, each entry > the matching entry of ``lower``.
    """

    def __init__(self, *, input_dim: int, width: int = 40, depth: int = 3,
                 lower: Sequence[float], upper: Sequence[float]) -> None:
        super().__init__()
        for label, value in (("input_dim", input_dim), ("width", width), ("depth", depth)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be an integer >= 1, got {value!r}")
        if len(lower) != input_dim or len(upper) != input_dim:
            raise ValueError(f"lower and upper need {input_dim} entries, got {len(lower)} and "
                             f"{len(upper)}")
        if not all(low < high for low, high in zip(lower, upper)):
            raise ValueError(f"need lower < upper in every coordinate, got {lower} and {upper}")
        low = torch.tensor(lower, dtype=torch.get_default_dtype())
        high = torch.tensor(upper, dtype=torch.get_default_dtype())
        # x -> scale * x + shift sends lower to -1 and upper to +1.
        self.register_buffer("input_scale", 2.0 / (high - low), persistent=False)
        self.register_buffer("input_shift", -(high + low) / (high - low), persistent=False)
        sizes = [input_dim] + [width] * depth
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(fan_in, fan_out), nn.Tanh()]
        layers.append(nn.Linear(width, 1))
        self.layers = nn.Sequential(*layers)
        for module in self.layers:
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The box mapped onto ``[-1, 1]^d`` (what the first layer sees)."""
        return x * self.input_scale + self.input_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1)`` network output at ``x`` ``(N, input_dim)``."""
        return self.layers(self.normalize(x))
