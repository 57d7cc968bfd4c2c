"""Tests of block construction (``mlbfgs_hpc.blocks``).

One layer (a module that owns parameters directly) per block by default; ``block_size`` groups
consecutive layers until a block reaches the target; tied weights are counted once, at their
first appearance; frozen parameters and buffers are excluded.
"""

from __future__ import annotations

import torch
from torch import nn

from mlbfgs_hpc import MLBFGS, blocks_from_parameters, build_blocks


def layered_model() -> nn.Module:
    # Layer parameter counts: 4·3+3 = 15, 3·5+5 = 20, BatchNorm 2·5 = 10, 5·2+2 = 12
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 5), nn.BatchNorm1d(5),
                         nn.Linear(5, 2))


def test_one_layer_per_block_by_default() -> None:
    blocks = build_blocks(layered_model())
    assert [b.name for b in blocks] == ["0", "2", "3", "4"]
    assert [b.numel for b in blocks] == [15, 20, 10, 12]
    assert blocks[0].param_names == ("0.weight", "0.bias")
    assert blocks[0].shapes == ((3, 4), (3,))
    assert all(n.split(".")[-1] in ("weight", "bias") for b in blocks for n in b.param_names)


def test_block_size_groups_consecutive_layers() -> None:
    model = layered_model()
    # 15 < 25 → add 20: 35 ≥ 25 closes; 10 < 25 → add 12: 22, last block (smaller)
    blocks = build_blocks(model, block_size=25)
    assert [b.name for b in blocks] == ["0..2", "3..4"]
    assert [b.numel for b in blocks] == [35, 22]
    assert blocks[0].param_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert [b.numel for b in build_blocks(model, block_size=15)] == [15, 20, 22]
    assert [b.numel for b in build_blocks(model, block_size=1)] == [15, 20, 10, 12]
    assert [b.numel for b in build_blocks(model, block_size=10**9)] == [57]


def test_blocks_cover_every_trainable_parameter_once_in_order() -> None:
    model = layered_model()
    for size in (None, 1, 25, 40, 10**6):
        params = [p for b in build_blocks(model, block_size=size) for p in b.params]
        assert [id(p) for p in params] == [id(p) for p in model.parameters()]


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.hidden = nn.Linear(4, 4)
        self.decoder = nn.Linear(4, 11)
        self.decoder.weight = self.embed.weight      # tied: one parameter, two modules


def test_tied_weights_counted_once_at_first_appearance() -> None:
    model = TiedLM()
    blocks = build_blocks(model)
    names = [n for b in blocks for n in b.param_names]
    assert names == ["embed.weight", "hidden.weight", "hidden.bias", "decoder.bias"]
    assert sum(b.numel for b in blocks) == sum(p.numel() for p in model.parameters())
    opt = MLBFGS(model.parameters(), blocks=blocks)     # covers model.parameters() exactly
    assert len(opt.blocks) == 3


def test_frozen_params_included_and_buffers_excluded() -> None:
    """Blocks hold frozen parameters too (the optimizer reads requires_grad at every step,
    so a frozen layer may be unfrozen later), never buffers."""
    model = layered_model()
    unfrozen = [(b.name, b.param_names) for b in build_blocks(model)]
    model[2].weight.requires_grad_(False)
    blocks = build_blocks(model)
    names = [n for b in blocks for n in b.param_names]
    assert "2.weight" in names and "2.bias" in names
    assert not any("running" in n for n in names)
    model[2].bias.requires_grad_(False)
    assert [(b.name, b.param_names) for b in build_blocks(model)] == unfrozen


def test_parameters_owned_by_the_root_module() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.lin = nn.Linear(3, 1)

    blocks = build_blocks(Root())
    assert [(b.name, b.param_names) for b in blocks] == [
        ("<root>", ("scale",)), ("lin", ("lin.weight", "lin.bias"))]


def test_blocks_from_parameters_one_per_tensor() -> None:
    params = [nn.Parameter(torch.zeros(2, 3)), nn.Parameter(torch.zeros(4))]
    blocks = blocks_from_parameters(params)
    assert [(b.name, b.numel) for b in blocks] == [("param.0", 6), ("param.1", 4)]
    assert MLBFGS(params).blocks == blocks


def test_blocks_do_not_depend_on_anything_but_model_and_size() -> None:
    a = [(b.name, b.param_names, b.numel) for b in build_blocks(layered_model(), block_size=25)]
    b = [(b.name, b.param_names, b.numel) for b in build_blocks(layered_model(), block_size=25)]
    assert a == b
