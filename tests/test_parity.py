"""MLBFGS behaves as a ``torch.optim`` optimizer where users' habits expect it (issue 35):
parameters without gradient, frozen and unfrozen parameters, copies and pickles, hooks,
sparse gradients, diverged runs, torch.distributed.checkpoint, and the messages for blocks
of another module and for a state saved with other settings.

Compiled and DDP-wrapped models are in ``test_parity_names.py``, the 2-rank versions of the
gradient and freezing rules in ``test_parity_distributed.py``, ``mlbfgs-train``'s exit code
for a diverged run and its resume warnings in ``test_run_dir.py``.
"""

from __future__ import annotations

import copy
import gc
import io
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.optim import lr_scheduler

from mlbfgs_hpc import MLBFGS, TrainingDivergedError, build_blocks
from mlbfgs_hpc.divergence import DEFAULT_MAX_CONSECUTIVE_SKIPS, DivergenceReport
from mlbfgs_hpc.participation import common_bits, pack_bits, words_for
from tests.optimizer_problems import F64, batches, make_mlp, train


class Heads(nn.Module):
    """A trunk and three heads: ``main`` always used, ``sometimes`` on the steps the caller
    says, ``never`` not at all (a leftover head)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 6)
        self.main = nn.Linear(6, 2)
        self.sometimes = nn.Linear(6, 2)
        self.never = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor, use_sometimes: bool = True) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.main(h)
        return out + self.sometimes(h) if use_sometimes else out


def data(count: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen,
                                                                       dtype=F64))
            for _ in range(count)]


def heads(seed: int = 0) -> Heads:
    torch.manual_seed(seed)
    return Heads().double()


def step(model: Heads, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
         use_sometimes: bool = True) -> None:
    opt.zero_grad()
    nn.functional.mse_loss(model(x, use_sometimes), y).backward()
    opt.step()


def snapshot(module: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def unchanged(module: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(module.parameters(), before))


# ---- 1. parameters without a gradient ---------------------------------------------------------
def test_parameter_without_gradient_is_not_moved_decayed_or_fed_to_the_curvature() -> None:
    """30 steps with pairs forming every 2 (and weight decay): the leftover head stays bit
    for bit where it was; its block offers no pair (none accepted, none rejected)."""
    model = heads()
    never = snapshot(model.never)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, weight_decay=0.1,
                 update_freq=2, history_size=3)
    for x, y in data(30):
        step(model, opt, x, y)
    assert unchanged(model.never, never)
    never_block = [b.name for b in opt.blocks].index("never")
    state = opt.block_state(never_block)
    assert int(state["accepted"]) == int(state["rejected"]) == 0
    assert state["grad_steps"].tolist() == [0, 0]
    assert not state["momentum_buffer"].any() and not state["m_grad"].any()
    assert opt.counters["accepted_pairs"] > 0       # the other blocks did get curvature


@pytest.mark.parametrize("nesterov", [False, True])
def test_before_the_first_pair_the_step_is_sgd_with_unused_parameters(nesterov: bool) -> None:
    """torch.optim.SGD(momentum=0.9) skips a parameter whose .grad is None (no decay, its
    momentum buffer waits, or starts at its first gradient): MLBFGS before its first pair
    steps exactly so, with a head never used and one used one step in three."""
    model, reference = heads(), heads()
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov}
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=1000, **kw)
    sgd = torch.optim.SGD(reference.parameters(), **kw)
    never = snapshot(model.never)
    for t, (x, y) in enumerate(data(15)):
        use = t % 3 == 1
        step(model, opt, x, y, use)
        step(reference, sgd, x, y, use)
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
    assert unchanged(model.never, never)


class TwoPart(nn.Module):
    """One layer owning two parameters, ``b`` used only when asked: one block in which only
    some parameters lack a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(5, dtype=F64))
        self.b = nn.Parameter(torch.randn(5, dtype=F64))

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        return x * self.a + (x * self.b if use_b else 0.0)


def test_block_with_some_parameters_without_gradient_holds_their_entries() -> None:
    """In a block where only ``a`` has a gradient, ``b``'s entries of the EMAs, the momentum
    buffer and the parameter stay as they were; ``a``'s move; the block's pairs stay finite
    and accepted (they measure what ``b`` did while it had a gradient)."""
    torch.manual_seed(0)
    model = TwoPart()
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05, update_freq=2,
                 history_size=3)
    assert len(opt.blocks) == 1
    gen = torch.Generator().manual_seed(1)
    for t in range(24):
        x = torch.randn(5, generator=gen, dtype=F64)
        use_b = t < 6 or t >= 16
        before = {k: v.clone() for k, v in opt.block_state(0).items()}
        b_before = model.b.detach().clone()
        opt.zero_grad()
        ((model(x, use_b) - 1.0) ** 2).sum().backward()
        opt.step()
        after = opt.block_state(0)
        if not use_b:
            assert torch.equal(model.b, b_before)
            for key in ("m_param", "m_grad", "momentum_buffer"):
                assert torch.equal(after[key][5:], before[key][5:]), (t, key)
                assert not torch.equal(after[key][:5], before[key][:5]), (t, key)
    state = opt.block_state(0)
    assert state["grad_steps"].tolist() == [24, 14]
    assert int(state["accepted"]) > 0 and torch.isfinite(state["S"]).all()


# ---- 2. trainability read at every step --------------------------------------------------------
@pytest.mark.parametrize("set_to_none", [True, False])
def test_frozen_later_is_untouched_and_unfrozen_trains_again(set_to_none: bool) -> None:
    """Freeze the trunk at step 8 (its .grad: None, or zeros left by zero_grad), unfreeze at
    16: in between it does not move at all (momentum neither), afterwards it trains."""
    model = heads()
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                 history_size=3, weight_decay=0.01)
    frozen = None
    for t, (x, y) in enumerate(data(30)):
        if t == 8:
            model.trunk.requires_grad_(False)
            frozen = snapshot(model.trunk)
        if t == 16:
            assert unchanged(model.trunk, frozen)
            model.trunk.requires_grad_(True)
        opt.zero_grad(set_to_none=set_to_none)
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert not unchanged(model.trunk, frozen)
    trunk = [b.name for b in opt.blocks].index("trunk")
    assert opt.block_state(trunk)["grad_steps"].tolist() == [22, 22]


def test_frozen_at_construction_trains_once_unfrozen() -> None:
    """The fine-tuning recipe: the backbone frozen for the first steps, then unfrozen. The
    optimizer was given all parameters; the backbone trains from its unfreezing on."""
    model = heads()
    model.trunk.requires_grad_(False)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2)
    start = snapshot(model.trunk)
    for t, (x, y) in enumerate(data(16)):
        if t == 6:
            assert unchanged(model.trunk, start)
            model.trunk.requires_grad_(True)
        step(model, opt, x, y)
    assert not unchanged(model.trunk, start)


# ---- 4. copies and pickles ----------------------------------------------------------------
def test_deepcopy_and_pickle_continue_exactly_as_the_original() -> None:
    """A copy (deepcopy of the model and optimizer together, or a pickle round trip) taken
    after 12 steps steps the copied model exactly as the original steps its own."""
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                 history_size=3, weight_decay=1e-3)
    sched = lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    all_data = batches(24)
    train(model, opt, sched, all_data[:12])
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    buffer = io.BytesIO()
    torch.save((model, opt), buffer)
    buffer.seek(0)
    copies.append(torch.load(buffer, weights_only=False))
    for x, y in all_data[12:]:
        for m, o in [(model, opt), *copies]:
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for m, o in copies:
        assert o.counters == opt.counters
        assert all(q is not p for q, p in zip(m.parameters(), model.parameters()))
        for p, q in zip(model.parameters(), m.parameters()):
            assert torch.equal(p, q)


# ---- 5. hooks ------------------------------------------------------------------------------
def test_hooks_are_released_with_the_optimizer_never_accumulated() -> None:
    """300 optimizers built in turn on one model (a sweep in one process) leave the hooks of
    the live one only; the live one's hooks still work (a backward pass is seen)."""
    model = make_mlp(0)
    weight = next(model.parameters())

    def hooks() -> int:
        return len(weight._post_accumulate_grad_hooks or {})

    for _ in range(300):
        MLBFGS(model.parameters(), blocks=build_blocks(model))
    gc.collect()
    assert hooks() == 0
    live = MLBFGS(model.parameters(), blocks=build_blocks(model))
    for _ in range(300):
        MLBFGS(model.parameters(), blocks=build_blocks(model))
    gc.collect()
    assert hooks() == 1
    live.synchronize()
    assert live._synchronized
    model(torch.randn(2, 5)).sum().backward()
    assert not live._synchronized
    del live
    gc.collect()
    assert hooks() == 0


# ---- 6. sparse gradients --------------------------------------------------------------------
def test_sparse_embedding_is_refused_at_construction_naming_it() -> None:
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"^0\.weight: Embedding\(sparse=True\) produces sparse "
                                         r"gradients.*sparse=False.*SparseAdam"):
        build_blocks(model)


def test_sparse_gradient_of_plain_params_is_refused_clearly_at_the_step() -> None:
    """Without a model (plain params) construction cannot see the embedding: the first step
    names the parameter instead of failing inside a reshape."""
    embedding = nn.Embedding(10, 3, sparse=True)
    opt = MLBFGS(embedding.parameters())
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"parameter 'param\.0' has a sparse gradient.*"
                                           r"sparse=False"):
        opt.step()
    assert opt.counters["step"] == 0


# ---- 7. diverged runs ---------------------------------------------------------------------
def test_non_finite_parameter_raises_at_once_naming_it() -> None:
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1)
    x, y = batches(1)[0]
    for _ in range(3):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        model[2].bias[1] = math.inf
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(TrainingDivergedError, match=r"parameter '2\.bias' is non-finite") as info:
        opt.step()
    assert info.value.reason == "non-finite parameters" and info.value.names == ("2.bias",)
    assert info.value.step == 3 and info.value.calls == 1


def _poisoned_steps(opt: MLBFGS, p: nn.Parameter, count: int) -> None:
    for _ in range(count):
        p.grad = torch.tensor([math.nan, 1.0])
        opt.step()


def test_consecutive_skips_are_bounded_and_warnings_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    """Skipped steps in a row raise at ``max_consecutive_skips`` (default 20) naming the
    parameter; a finite step in between resets the count; the warnings come at the 1st, 2nd,
    4th, ... skipped step only."""
    assert DEFAULT_MAX_CONSECUTIVE_SKIPS == 20
    p = nn.Parameter(torch.ones(2))
    opt = MLBFGS([p], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="mlbfgs_hpc"):
        _poisoned_steps(opt, p, 19)
        p.grad = torch.ones(2)
        opt.step()                                  # a finite step: the streak ends
        _poisoned_steps(opt, p, 19)
        with pytest.raises(TrainingDivergedError, match=r"non-finite at 20 steps in a row.*"
                                                        r"'param\.0'") as info:
            _poisoned_steps(opt, p, 1)
    assert info.value.reason == "non-finite gradients" and info.value.calls == 20
    assert opt.counters["skipped_steps"] == 38 and opt.counters["step"] == 1
    warned = [r.getMessage() for r in caplog.records if "step skipped" in r.getMessage()]
    assert [int(m.split("(")[2].split()[0]) for m in warned] == [1, 2, 4, 8, 16, 32]


def test_skips_never_raise_without_a_bound(caplog: pytest.LogCaptureFixture) -> None:
    p = nn.Parameter(torch.ones(2))
    opt = MLBFGS([p], lr=0.1, max_consecutive_skips=None)
    with caplog.at_level(logging.WARNING, logger="mlbfgs_hpc"):
        _poisoned_steps(opt, p, 200)
    assert opt.counters["skipped_steps"] == 200
    assert len([r for r in caplog.records if "step skipped" in r.getMessage()]) == 8
    with pytest.raises(ValueError, match="max_consecutive_skips"):
        MLBFGS([p], max_consecutive_skips=0)


def test_grad_scaler_recipe_skips_in_the_scaler_and_never_trips_the_bound() -> None:
    """The documented GradScaler recipe with a scale far too large: the scaled gradients
    overflow float32 for dozens of steps in a row, the scaler skips them itself (halving its
    scale each time; MLBFGS never sees them, so a bound of 2 is not tripped) and the run
    goes on once the scale fits."""
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.01,
                 max_consecutive_skips=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=1000)
    for x, y in batches(60):
        opt.zero_grad()
        scaler.scale(1e4 * nn.functional.mse_loss(model(x), y)).backward()
        opt.synchronize()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
    skipped_by_scaler = 127 - int(math.log2(scaler.get_scale()))
    assert skipped_by_scaler > 2
    assert opt.counters["step"] == 60 - skipped_by_scaler > 0
    assert opt.counters["skipped_steps"] == 0


# ---- 8. torch.distributed.checkpoint ------------------------------------------------------
def test_distributed_checkpoint_is_refused_clearly_and_changes_nothing() -> None:
    """get_optimizer_state_dict steps an optimizer without state at lr 0 to "initialise"
    it; MLBFGS's state is per block and per rank, which DCP's per-parameter format cannot
    hold: both calls raise, pointing to the HDF5 checkpoints, and nothing changed."""
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1)
    train(model, opt, lr_scheduler.StepLR(opt, step_size=5), batches(3))
    opt.zero_grad()
    state, params = opt.state_dict(), snapshot(model)
    with pytest.raises(NotImplementedError, match="mlbfgs_hpc.checkpoint.save_checkpoint"):
        get_optimizer_state_dict(model, opt)
    with pytest.raises(NotImplementedError, match="sharded HDF5 checkpoints"):
        set_optimizer_state_dict(model, opt, state)
    assert unchanged(model, params)
    assert (opt.counters["step"], opt.counters["skipped_steps"]) == (3, 0)
    assert opt.param_groups[0]["lr"] == 0.1 and all(p.grad is None for p in model.parameters())
    after = opt.state_dict()
    for b, block in state["state"].items():
        assert all(torch.equal(after["state"][b][k], v) for k, v in block.items())
    # torch's own optimizers pass the same round trip (the call itself works here).
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    set_optimizer_state_dict(model, sgd, get_optimizer_state_dict(model, sgd))


# ---- 9. blocks of another module ------------------------------------------------------------
def test_blocks_of_the_whole_model_for_part_of_it_suggest_the_part() -> None:
    model = heads()
    with pytest.raises(ValueError, match=r"not being optimized: \['trunk\.weight'.*"
                                         r"blocks=build_blocks\(model\.main\)"):
        MLBFGS(model.main.parameters(), blocks=build_blocks(model))
    nested = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1)))
    with pytest.raises(ValueError, match=r"blocks=build_blocks\(model\[1\]\)"):
        MLBFGS(nested[1].parameters(), blocks=build_blocks(nested))
    assert len(MLBFGS(model.main.parameters(), blocks=build_blocks(model.main)).blocks) == 1


def test_filtering_out_frozen_parameters_says_they_may_stay() -> None:
    model = heads()
    model.trunk.requires_grad_(False)
    with pytest.raises(ValueError, match=r"Frozen parameters may stay.*"
                                         r"MLBFGS\(model\.parameters\(\), "):
        MLBFGS([p for p in model.parameters() if p.requires_grad], blocks=build_blocks(model))


# ---- 10. a state saved with other settings --------------------------------------------------
def test_loading_a_state_with_other_settings_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    model = make_mlp(0)
    saved = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=50)
    state = saved.state_dict()
    other = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=20,
                   damping=0.1)
    same = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=50)
    with caplog.at_level(logging.WARNING, logger="mlbfgs_hpc"):
        same.load_state_dict(state)
        assert not caplog.records
        other.load_state_dict(state)
        assert len(caplog.records) == 1
        other.load_state_dict(state, warn_changed_settings=False)
    assert len(caplog.records) == 1
    assert "update_freq: 50 -> 20" in caplog.records[0].getMessage()
    assert "damping: 0.2 -> 0.1" in caplog.records[0].getMessage()
    assert other.config.update_freq == 20                   # the new value applies


# ---- the pure pieces --------------------------------------------------------------------------
def test_idle_flags_pack_into_words_and_and_over_ranks() -> None:
    """130 parameters (3 words of 52 flags) on 3 ranks: idle where every rank says so."""
    gen = torch.Generator().manual_seed(0)
    flags = (torch.rand(3, 130, generator=gen) < 0.7).tolist()
    rows = np.array([pack_bits(f) for f in flags])
    assert rows.shape == (3, words_for(130)) == (3, 3)
    expected = [i for i in range(130) if all(f[i] for f in flags)]
    assert common_bits(rows, 130) == expected and 0 < len(expected) < 130
    assert common_bits(np.array([pack_bits([False] * 60)]), 60) == []


def test_unused_parameter_beyond_the_first_word_is_left_alone() -> None:
    """60 parameter tensors: the unused layer's are the 57th and 58th (flags 56, 57: the
    second word of the allgather)."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(30))
    opt = MLBFGS(layers.parameters(), blocks=build_blocks(layers), lr=0.1, weight_decay=0.1)
    unused = snapshot(layers[28])
    for x, _ in data(5):
        h = x[:, :3]
        for i, layer in enumerate(layers):
            if i != 28:
                h = torch.tanh(layer(h.float()))
        opt.zero_grad()
        h.sum().backward()
        opt.step()
    assert unchanged(layers[28], unused)
    assert [b.name for b in opt.blocks][28] == "28" and len(opt._layout_params) == 60
    assert opt.block_state(28)["grad_steps"].tolist() == [0, 0]
    assert opt.block_state(29)["grad_steps"].tolist() == [5, 5]


def test_last_good_checkpoint_is_before_the_trouble_began() -> None:
    """20 skipped steps ending at step 31: the parameters of step 11 (the first skipped
    step's) are suspect, the checkpoint of step 10 the last good one; a non-finite
    parameter at step 31 makes step 30's checkpoint suspect."""
    checkpoints = [(s, Path(f"ck/step-{s:06d}")) for s in (5, 10, 11, 20, 30)]
    skipped = TrainingDivergedError("x", reason="non-finite gradients", names=("w",), step=10,
                                    calls=20)
    report = DivergenceReport.of(skipped, failed_step=31, run_dir=Path("run"),
                                 checkpoints=checkpoints)
    assert report.last_good == (10, Path("ck/step-000010"))
    assert "last good checkpoint: ck/step-000010 (step 10)" in report.message()
    bad_param = TrainingDivergedError("x", reason="non-finite parameters", names=("w",),
                                      step=30, calls=1)
    assert DivergenceReport.of(bad_param, failed_step=31, run_dir=Path("run"),
                               checkpoints=checkpoints).last_good[0] == 20
    none = DivergenceReport.of(skipped, failed_step=31, run_dir=Path("run"),
                               checkpoints=checkpoints[2:])
    assert none.last_good is None and "no checkpoint of step 10 or earlier" in none.message()
