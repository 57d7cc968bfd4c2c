"""Every ``ValueError`` path of the optimizer's arguments names the offending argument.

Covered: each :class:`MLBFGSConfig` field (directly and through the :class:`MLBFGS`
constructor), ``lr`` and ``weight_decay`` (defaults and per param group), blocks that do not
cover the parameters, mixed dtypes/devices, ``build_blocks``' ``block_size`` and
``grad_backend``. Valid edge values are accepted.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from mlbfgs_hpc import MLBFGS, MLBFGSConfig, ParamBlock, build_blocks

NAN, INF = math.nan, math.inf

BAD_CONFIG: list[tuple[str, Any]] = [
    ("history_size", 0), ("history_size", -3), ("history_size", 2.0), ("history_size", "10"),
    ("history_size", True),
    ("update_freq", 0), ("update_freq", 1.5), ("update_freq", None), ("update_freq", False),
    ("beta_param", -0.1), ("beta_param", 1.0), ("beta_param", NAN), ("beta_param", True),
    ("beta_grad", -1e-9), ("beta_grad", 1.5), ("beta_grad", INF), ("beta_grad", "0.9"),
    ("damping", -0.2), ("damping", 1.0), ("damping", NAN),
    ("sigma_low", -0.01), ("sigma_low", 1.0), ("sigma_low", NAN),
    ("sigma_high", 1.0), ("sigma_high", 0.5), ("sigma_high", NAN), ("sigma_high", -INF),
    ("curvature_eps", -1e-8), ("curvature_eps", INF), ("curvature_eps", NAN),
    ("clip", "KL"), ("clip", None), ("clip", "norm"),
    ("kl_clip", 0.0), ("kl_clip", -0.005), ("kl_clip", INF), ("kl_clip", NAN),
    ("nesterov", 1), ("nesterov", "yes"),
    ("max_grad_norm", 0.0), ("max_grad_norm", -1.0), ("max_grad_norm", NAN),
    ("max_grad_norm", INF), ("max_grad_norm", "1"),
]


@pytest.mark.parametrize(("name", "value"), BAD_CONFIG)
def test_config_rejects_bad_value_naming_argument(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        MLBFGSConfig(**{name: value})


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, v in BAD_CONFIG if v is not None])
def test_optimizer_rejects_bad_config_value(name: str, value: Any) -> None:
    # (None is not bad for the constructor: it stands for the mode's default, see
    # test_line_search_defaults.)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        MLBFGS([nn.Parameter(torch.zeros(3))], **{name: value})


def test_nesterov_needs_momentum_in_every_group() -> None:
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="^nesterov must be.*momentum"):
        MLBFGS([p], nesterov=True, momentum=0.0)
    with pytest.raises(ValueError, match="^nesterov must be.*momentum"):
        MLBFGS([{"params": [p]}, {"params": [q], "momentum": 0.0}], nesterov=True)
    assert MLBFGS([p, q], nesterov=True, momentum=0.5).config.nesterov


@pytest.mark.parametrize("kwargs", [
    {"history_size": 1, "update_freq": 1},
    {"beta_param": 0.0, "beta_grad": 0.0, "damping": 0.0, "sigma_low": 0.0},
    {"beta_param": 0.999, "damping": 0.99, "sigma_high": 1.0001, "curvature_eps": 0.0},
    {"sigma_low": 0.0, "sigma_high": INF},   # no window at all
    {"clip": "none", "kl_clip": 1e9},
])
def test_config_accepts_edge_values(kwargs: dict[str, Any]) -> None:
    config = MLBFGSConfig(**kwargs)
    assert all(getattr(config, k) == v for k, v in kwargs.items())
    MLBFGS([nn.Parameter(torch.zeros(3))], **kwargs)


def test_config_defaults_match_design() -> None:
    assert MLBFGSConfig().to_dict() == {
        "history_size": 10, "update_freq": 50, "beta_param": 0.9, "beta_grad": 0.9,
        "damping": 0.2, "sigma_low": 0.01, "sigma_high": 1.5, "curvature_eps": 1e-8,
        "clip": "graft", "kl_clip": 0.005, "nesterov": False,
        "pair_momentum": 0.0, "double_damping": 0.2, "max_grad_norm": None}


def test_momentum_defaults_to_the_design_in_every_group() -> None:
    opt = MLBFGS([{"params": [nn.Parameter(torch.zeros(3))]},
                  {"params": [nn.Parameter(torch.zeros(2))], "momentum": 0.5}])
    assert [g["momentum"] for g in opt.param_groups] == [0.9, 0.5]
    MLBFGS([nn.Parameter(torch.zeros(3))], momentum=0.0)   # 0: no outer momentum


@pytest.mark.parametrize("value", [-0.1, 1.0, NAN, INF, "0.9", None, True])
def test_group_momentum_rejected_naming_argument(value: Any) -> None:
    p = nn.Parameter(torch.zeros(3))
    if value is not None:   # the constructor's None is the mode's default momentum
        with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\)"):
            MLBFGS([p], momentum=value)
    with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\)"):
        MLBFGS([{"params": [p], "momentum": value}])


@pytest.mark.parametrize("name", ["lr", "weight_decay"])
@pytest.mark.parametrize("value", [-0.1, NAN, INF, "0.1", None, True])
def test_group_hyperparameters_rejected_naming_argument(name: str, value: Any) -> None:
    p = nn.Parameter(torch.zeros(3))
    if not (name == "lr" and value is None):   # lr=None: the mode's default lr
        with pytest.raises(ValueError, match=rf"^{name} must be"):
            MLBFGS([p], **{name: value})
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        MLBFGS([{"params": [p], name: value}])


def test_zero_lr_and_weight_decay_are_valid() -> None:
    MLBFGS([nn.Parameter(torch.zeros(3))], lr=0.0, weight_decay=0.0)


@pytest.mark.parametrize("value", ["nccl", "", "Horovod"])
def test_grad_backend_rejected_naming_argument(value: str) -> None:
    with pytest.raises(ValueError, match="^grad_backend must be"):
        MLBFGS([nn.Parameter(torch.zeros(3))], grad_backend=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["auto", "horovod", "mpi", None])
def test_grad_backend_valid_values(value: str | None) -> None:
    opt = MLBFGS([nn.Parameter(torch.zeros(3))], grad_backend=value)  # type: ignore[arg-type]
    assert opt.grad_backend == value


def _block(name: str, *params: torch.Tensor) -> ParamBlock:
    return ParamBlock(name=name, param_names=tuple(f"{name}.{i}" for i in range(len(params))),
                      params=params)


def test_blocks_missing_a_parameter() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^blocks must cover.*param index\): \[1\]"):
        MLBFGS([a, b], blocks=[_block("a", a)])


def test_blocks_with_a_parameter_not_optimized() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"^blocks must cover.*not being optimized: \['x.1'\]"):
        MLBFGS([a], blocks=[_block("x", a, b)])


def test_blocks_sharing_a_parameter() -> None:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="^blocks must not share"):
        MLBFGS([a, b], blocks=[_block("x", a, b), _block("y", a)])


def test_frozen_parameters_in_groups_are_ignored() -> None:
    """Like torch optimizers, frozen params may be passed (model.parameters()) but never move;
    the optimizer holds them (blocks cover them) so that they can be unfrozen later."""
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)
    frozen = [p.detach().clone() for p in model[0].parameters()]
    for blocks in (build_blocks(model), None):
        opt = MLBFGS(model.parameters(), blocks=blocks, weight_decay=0.1)
        assert sum(b.numel for b in opt.blocks) == 3 * 3 + 3 + 3 * 2 + 2
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        for p, p0 in zip(model[0].parameters(), frozen):
            assert torch.equal(p, p0)
    trainable = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="^blocks must cover"):
        MLBFGS(model.parameters(), blocks=build_blocks(trainable))


def test_mixed_dtypes_rejected() -> None:
    a = nn.Parameter(torch.zeros(2, dtype=torch.float32))
    b = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^params must share one floating dtype.*float32.*"
                                         r"float64"):
        MLBFGS([a, b])


def test_mixed_devices_rejected() -> None:
    a = nn.Parameter(torch.zeros(2))
    b = nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match=r"^params must share.*devices.*meta"):
        MLBFGS([a, b])


@pytest.mark.parametrize("value", [0, -1, 2.5, "100", True])
def test_build_blocks_rejects_bad_block_size(value: Any) -> None:
    with pytest.raises(ValueError, match="^block_size must be"):
        build_blocks(nn.Linear(2, 2), block_size=value)


def test_build_blocks_rejects_model_without_params() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        build_blocks(nn.ReLU())
    # A wholly frozen model has blocks: it may be unfrozen later.
    assert len(build_blocks(nn.Linear(2, 2).requires_grad_(False))) == 1
