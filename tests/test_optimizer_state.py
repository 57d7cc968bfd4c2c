"""Single-process tests of :class:`mlbfgs_hpc.MLBFGS`'s state: checkpoint round trips that
continue bit for bit, the counters, and buffers that are allocated once (no per-step
allocation that grows with the model)."""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from mlbfgs_hpc import MLBFGS, build_blocks
from tests.optimizer_problems import batches, make_mlp, make_opt, train


# ---- checkpoints ---------------------------------------------------------------------------
OptFactory = Callable[[nn.Module], tuple[MLBFGS, Any]]


def _round_trip(make: OptFactory, *, on_saved: Callable[[MLBFGS], None],
                on_loaded: Callable[[MLBFGS], None]) -> MLBFGS:
    """24 steps uninterrupted, and 12 + a ``torch.save``/``torch.load`` round trip into a model
    and optimizer built afresh from another initialisation + 12: the parameters must be equal
    bit for bit. ``on_saved``/``on_loaded`` check the optimizer at the save, and right after
    the load into the fresh one (given the scheduler's state too); returns the resumed one."""
    data = batches(24)
    model = make_mlp(0)
    opt, sched = make(model)
    train(model, opt, sched, data)
    uninterrupted = [p.detach().clone() for p in model.parameters()]

    model = make_mlp(0)
    opt, sched = make(model)
    train(model, opt, sched, data[:12])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, buf)
    on_saved(opt)
    del model, opt, sched

    buf.seek(0)
    ckpt = torch.load(buf)  # the default (weights_only) loader: plain tensors and containers
    model = make_mlp(99)    # different initialisation: everything must come from the checkpoint
    opt, sched = make(model)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    on_loaded(opt)
    train(model, opt, sched, data[12:])
    for a, b in zip(uninterrupted, model.parameters()):
        assert torch.equal(a, b.detach())
    return opt


def test_checkpoint_round_trip_continues_bit_identically() -> None:
    def rings_wrapped(opt: MLBFGS) -> None:
        # Pairs exist and every ring wrapped (pairs at t = 4, 6, ..., 12: 5 > m = 3).
        for block_state in opt.state_dict()["state"].values():
            assert int(block_state["count"]) == 3 and int(block_state["accepted"]) == 5
            assert int(block_state["head"]) == 5 % 3

    def lr_restored(opt: MLBFGS) -> None:
        assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)

    resumed = _round_trip(make_opt, on_saved=rings_wrapped, on_loaded=lr_restored)
    assert resumed.counters["step"] == 24


def test_one_cycle_momentum_round_trip_continues_bit_identically() -> None:
    """The scheduler's momentum lives in the param groups, so the checkpoint carries it: a
    resumed run steps with the saved μ, not the one a fresh scheduler starts from."""
    def one_cycle(model: nn.Module) -> tuple[MLBFGS, lr_scheduler.OneCycleLR]:
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, history_size=3,
                     update_freq=2)
        return opt, lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=24)  # cycles μ

    saved: list[float] = []
    fresh_start = one_cycle(make_mlp(0))[0].param_groups[0]["momentum"]

    def momentum_restored(opt: MLBFGS) -> None:
        assert opt.param_groups[0]["momentum"] == saved[0] != fresh_start

    _round_trip(one_cycle, on_saved=lambda opt: saved.append(opt.param_groups[0]["momentum"]),
                on_loaded=momentum_restored)


def test_state_without_group_momentum_keeps_the_constructors() -> None:
    """States written while momentum was an optimizer-wide setting have no ``momentum`` in
    their param groups: they load, and the groups keep this optimizer's momentum."""
    data = batches(6)
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), momentum=0.9)
    train(model, opt, lr_scheduler.StepLR(opt, step_size=5), data)
    state = opt.state_dict()
    for group in state["param_groups"]:
        del group["momentum"]
    fresh = make_mlp(0)
    other = MLBFGS(fresh.parameters(), blocks=build_blocks(fresh), momentum=0.5)
    other.load_state_dict(state)
    assert other.param_groups[0]["momentum"] == 0.5
    assert other.counters["step"] == 6


def test_state_dict_is_a_snapshot_not_a_view() -> None:
    data = batches(8)
    model = make_mlp(0)
    opt, sched = make_opt(model)
    train(model, opt, sched, data[:5])
    saved = opt.state_dict()
    frozen = {b: {k: v.clone() for k, v in s.items()} for b, s in saved["state"].items()}
    train(model, opt, sched, data[5:])
    for b, s in saved["state"].items():
        for k, v in s.items():
            assert torch.equal(v, frozen[b][k]), (b, k)


def test_load_state_dict_rejects_other_blocks() -> None:
    model = make_mlp(0)
    opt, _ = make_opt(model)
    other = MLBFGS(model.parameters(), blocks=build_blocks(model, block_size=60))
    with pytest.raises(ValueError, match="blocks"):
        other.load_state_dict(opt.state_dict())


# ---- counters ------------------------------------------------------------------------------
def test_counters_are_readable_and_consistent() -> None:
    data = batches(21)
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=4,
                 history_size=2)
    fresh = opt.counters
    assert fresh == {"step": 0, "skipped_steps": 0, "sgd_fallbacks": 0, "accepted_pairs": 0,
                     "rejected_pairs": 0, "last_nu": 1.0, "last_gamma": fresh["last_gamma"]}
    assert math.isnan(fresh["last_gamma"])
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    c = opt.counters
    assert all(isinstance(c[k], int) for k in ("step", "skipped_steps", "sgd_fallbacks",
                                               "accepted_pairs", "rejected_pairs"))
    assert all(isinstance(c[k], float) for k in ("last_nu", "last_gamma"))
    n_blocks = len(opt.blocks)
    assert n_blocks == 3
    assert c["step"] == 21
    assert c["accepted_pairs"] + c["rejected_pairs"] == n_blocks * (21 // 4 - 1)
    assert 0.0 < c["last_nu"] <= 1.0
    gammas = [float(opt.block_state(b)["gamma"]) for b in range(n_blocks)]
    assert c["last_gamma"] == pytest.approx(sum(gammas) / n_blocks, rel=1e-6)
    assert opt.optimizer_state_bytes() > 0


# ---- no per-step allocation of optimizer state ----------------------------------------------
def test_internal_buffers_are_allocated_once() -> None:
    data = batches(13)
    model = make_mlp(0)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                 history_size=2)

    def pointers() -> dict[str, int]:
        tensors = {"grad": opt._grad, "param": opt._param, "direction": opt._direction,
                   "update": opt._update,
                   **{f"pairs.{i}": v for i, v in enumerate(opt._stochastic.pairs.tensors()) if v.numel()},
                   **{f"flat.{k}": v for k, v in opt._flat_state.items()},
                   **{f"global.{k}": v for k, v in opt._global.items()}}
        for b, curv in opt._stochastic.curvature.items():
            tensors.update({f"{b}.{k}": v for k, v in curv.state_tensors().items()})
        tensors.update({f"param{i}": p for i, p in enumerate(model.parameters())})
        return {k: v.data_ptr() for k, v in tensors.items()}

    seen = None
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if i == 0:
            seen = pointers()
    assert opt.counters["accepted_pairs"] > 2 * len(opt.blocks)  # rings wrapped meanwhile
    assert pointers() == seen


def test_step_allocation_does_not_grow_with_model_size() -> None:
    """Per-step temporaries are O(#blocks) scalars, never O(#parameters).

    A step that accepts pairs also rebuilds each block's compact-form matrix W: float64
    matrices of (2m)² entries and the Gram matrices, O(#blocks · m²), still independent of
    the number of parameters."""
    allocated = {}
    for width in (16, 512):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), update_freq=2,
                     history_size=3)
        x, y = torch.randn(8, width), torch.randn(8, 10)
        for t in range(1, 13):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if t < 11:
                opt.step()
                continue
            # Step 11 is a plain curvature step, step 12 also forms pairs.
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                        profile_memory=True) as prof:
                opt.step()
            allocated[(width, t)] = sum(e.cpu_memory_usage for e in prof.events()
                                        if e.cpu_memory_usage > 0)
    assert opt.counters["accepted_pairs"] > 0
    n_big = sum(p.numel() for p in model.parameters())
    assert max(allocated[(16, 11)], allocated[(512, 11)]) < 1024 < n_big, allocated
    assert max(allocated[(16, 12)], allocated[(512, 12)]) < 16 * 1024 < 4 * n_big, allocated
    # Same blocks and history, 30x the parameters: the same allocations, give or take the
    # few bytes of scalars whose values differ.
    for t in (11, 12):
        assert abs(allocated[(512, t)] - allocated[(16, t)]) <= 64, allocated
