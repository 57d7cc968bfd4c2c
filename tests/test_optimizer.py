"""Single-process tests of :class:`mlbfgs_hpc.MLBFGS`'s step: param groups and every torch LR
scheduler (before the first pair the step is ``torch.optim.SGD``'s), skipped non-finite
steps, the closure, the SGD fall-back and the KL guard, and the pair smoothing.

The step's maths against independent references is in ``test_optimizer_reference.py``; the
optimizer's state (checkpoints, counters, buffers) in ``test_optimizer_state.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from mlbfgs_hpc import MLBFGS, build_blocks
from tests.optimizer_problems import F64, batches, make_mlp


# ---- param groups and schedulers ------------------------------------------------------------
def test_param_groups_follow_their_lr_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    frozen0 = [p.detach().clone() for p in model[0].parameters()]
    opt = MLBFGS([{"params": model[0].parameters(), "lr": 0.0},
                  {"params": model[2].parameters(), "weight_decay": 0.1}],
                 lr=0.05, momentum=0.0, update_freq=1000)
    x, y = torch.randn(10, 4, dtype=F64), torch.randn(10, 2, dtype=F64)
    nn.functional.mse_loss(model(x), y).backward()
    before = [p.detach().clone() for p in model[2].parameters()]
    grads = [p.grad.clone() for p in model[2].parameters()]
    opt.step()
    for p, p0, g in zip(model[2].parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.05 * (g + 0.1 * p0), rtol=1e-14, atol=0)
    for p, p0 in zip(model[0].parameters(), frozen0):
        assert torch.equal(p.detach(), p0)


def test_zero_lr_group_stays_put_with_curvature_and_a_shared_block() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    start = [p.detach().clone() for p in model.parameters()]
    # One block spans both groups: the lr is applied per group segment inside the block.
    blocks = build_blocks(model, block_size=10_000)
    assert len(blocks) == 1
    opt = MLBFGS([{"params": model[0].parameters()},
                  {"params": model[2].parameters(), "lr": 0.0}],
                 blocks=blocks, lr=0.1, update_freq=2, history_size=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        x, y = torch.randn(10, 4, generator=gen, dtype=F64), torch.randn(10, 2, generator=gen,
                                                                         dtype=F64)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert opt.counters["accepted_pairs"] > 3
    assert not torch.equal(model[0].weight.detach(), start[0])
    for p, p0 in zip(model[2].parameters(), start[2:]):
        assert torch.equal(p.detach(), p0)


def test_add_param_group_after_construction_is_refused() -> None:
    opt = MLBFGS([nn.Parameter(torch.zeros(2))])
    with pytest.raises(RuntimeError, match="add_param_group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})


SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=10),
    "CosineAnnealingWarmRestarts":
        lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=4),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.95),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=6),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=4),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=10, power=2.0),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12,
                                                    cycle_momentum=False),
    "OneCycleLR-momentum": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=12),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2, step_size_up=3,
                                                cycle_momentum=False),
    "CyclicLR-momentum": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.2,
                                                         step_size_up=3),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o, [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            lr_scheduler.ExponentialLR(o, gamma=0.8)], milestones=[3]),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=3),
         lr_scheduler.ExponentialLR(o, gamma=0.9)]),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


def _sgd_twins(*, seed: int, nesterov: bool, **mlbfgs_kw: Any
               ) -> tuple[nn.Module, nn.Module, torch.optim.SGD, MLBFGS]:
    """Two copies of one small float64 model: SGD (momentum 0.9, weight decay 0.01) on the
    first, MLBFGS with no pair in sight (T = 1000) and the same settings on the second."""
    torch.manual_seed(seed)
    ref_model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model.load_state_dict(ref_model.state_dict())
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "nesterov": nesterov}
    return (ref_model, model, torch.optim.SGD(ref_model.parameters(), **kw),
            MLBFGS(model.parameters(), update_freq=1000, **kw, **mlbfgs_kw))


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_warmup_equals_sgd_under_every_scheduler(name: str, nesterov: bool) -> None:
    """Before the first pair the step is SGD with momentum, at the group's current lr and
    momentum (the ``-momentum`` schedulers cycle it)."""
    ref_model, model, sgd, opt = _sgd_twins(seed=0, nesterov=nesterov)
    scheds = [SCHEDULERS[name](sgd), SCHEDULERS[name](opt)]
    gen = torch.Generator().manual_seed(0)
    lrs: list[tuple[float, float]] = []
    momenta: list[tuple[float, float]] = []
    for _ in range(12):
        x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen,
                                                                        dtype=F64)
        losses = []
        for m, o, s in ((ref_model, sgd, scheds[0]), (model, opt, scheds[1])):
            o.zero_grad()
            loss = nn.functional.mse_loss(m(x), y)
            loss.backward()
            o.step()
            losses.append(float(loss.detach()))
        lrs.append((sgd.param_groups[0]["lr"], opt.param_groups[0]["lr"]))
        momenta.append((sgd.param_groups[0]["momentum"], opt.param_groups[0]["momentum"]))
        for (m, o, s), loss in zip(((ref_model, sgd, scheds[0]), (model, opt, scheds[1])),
                                   losses):
            if isinstance(s, lr_scheduler.ReduceLROnPlateau):
                s.step(loss)
            else:
                s.step()
    assert [a for a, _ in lrs] == [b for _, b in lrs]
    assert len({a for a, _ in lrs}) > 1                        # the schedule did change lr
    assert [a for a, _ in momenta] == [b for _, b in momenta]
    assert (len({a for a, _ in momenta}) > 1) == name.endswith("-momentum")
    for p, q in zip(ref_model.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("nesterov", [False, True])
def test_groups_follow_their_own_momentum_as_sgd(nesterov: bool) -> None:
    """Each group's outer momentum is its own, changed between steps as a scheduler would
    (0 in between: the buffer waits, as SGD's does); before the first pair that is SGD."""
    torch.manual_seed(2)
    ref_model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    model.load_state_dict(ref_model.state_dict())

    def groups(m: nn.Module) -> list[dict[str, Any]]:
        return [{"params": m[0].parameters(), "momentum": 0.5},
                {"params": m[2].parameters(), "momentum": 0.9}]

    sgd = torch.optim.SGD(groups(ref_model), lr=0.1, momentum=0.9, nesterov=nesterov)
    opt = MLBFGS(groups(model), lr=0.1, update_freq=1000, nesterov=nesterov)
    plan = [(0.5, 0.9), (0.8, 0.9), (0.8, 0.0), (0.8, 0.0), (0.3, 0.7), (0.3, 0.7)]
    gen = torch.Generator().manual_seed(0)
    for momenta in plan:
        x, y = torch.randn(8, 4, generator=gen, dtype=F64), torch.randn(8, 2, generator=gen,
                                                                        dtype=F64)
        for m, o in ((ref_model, sgd), (model, opt)):
            for group, mu in zip(o.param_groups, momenta):
                group["momentum"] = mu
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            o.step()
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


# ---- gradient clipping and synchronize() ----------------------------------------------------
@pytest.mark.parametrize("nesterov", [False, True])
def test_max_grad_norm_is_clip_grad_norm_then_the_step(nesterov: bool) -> None:
    """Before the first pair, ``max_grad_norm=c`` steps as ``clip_grad_norm_(c)`` followed
    by SGD (weight decay after the clip, as torch's), and reports the norm it clipped."""
    ref_model, model, sgd, opt = _sgd_twins(seed=3, nesterov=nesterov, max_grad_norm=0.5)
    gen = torch.Generator().manual_seed(0)
    clipped = 0
    for step in range(10):
        # Large targets for the first steps: norms above 0.5 (clipped), then below (not).
        size = 10.0 if step < 5 else 0.01
        x = torch.randn(8, 4, generator=gen, dtype=F64)
        y = size * torch.randn(8, 2, generator=gen, dtype=F64)
        for m, o in ((ref_model, sgd), (model, opt)):
            o.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
            if o is sgd:
                norm = float(torch.nn.utils.clip_grad_norm_(m.parameters(), 0.5))
            o.step()
        assert opt.last_grad_norm == pytest.approx(norm, rel=1e-12)
        clipped += norm > 0.5
        for p, q in zip(ref_model.parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    assert 0 < clipped < 10


def test_without_max_grad_norm_nothing_is_clipped_or_measured() -> None:
    p = nn.Parameter(torch.full((3,), 100.0))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000)
    p.grad = torch.full((3,), 100.0)
    opt.step()
    assert torch.equal(p.detach(), torch.full((3,), 90.0))
    assert math.isnan(opt.last_grad_norm)


def test_synchronize_waits_once_per_backward_pass() -> None:
    """``synchronize()`` averages once per backward pass: step() does not wait again, and any
    new backward pass, with or without a step in between (a GradScaler skipping an overflowed
    step), is averaged afresh (here: a reducer that counts)."""
    p = nn.Parameter(torch.zeros(3))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000, grad_backend=None)
    calls: list[int] = []

    class Counting:
        owned_grad = None

        def synchronize(self) -> None:
            calls.append(1)

    def backward() -> torch.Tensor:
        opt.zero_grad()
        loss = (p * torch.ones(3)).sum()
        loss.backward()
        return loss.detach()

    opt._reducer = Counting()  # type: ignore[assignment]
    for _ in range(3):
        backward()
        opt.synchronize()
        opt.synchronize()
        opt.step()
    assert len(calls) == 3
    backward()
    opt.step()
    assert len(calls) == 4
    backward()
    opt.synchronize()      # ... and no step: the scaler found an overflow
    backward()
    opt.synchronize()
    opt.step()
    assert len(calls) == 6
    opt.step(backward)     # a closure's backward pass is averaged too
    assert len(calls) == 7


# ---- non-finite gradients -------------------------------------------------------------------
def test_non_finite_gradient_skips_the_step_and_never_enters_history() -> None:
    data = batches(14)

    def run(poison_after: int | None) -> tuple[nn.Module, MLBFGS]:
        model = make_mlp(3)
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                     history_size=3)
        for i, (x, y) in enumerate(data):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if i == poison_after:
                for bad in (math.nan, math.inf, -math.inf):
                    before = [p.detach().clone() for p in model.parameters()]
                    state_before = opt.state_dict()
                    opt.zero_grad()
                    nn.functional.mse_loss(model(x), y).backward()
                    model[2].weight.grad[1, 1] = bad
                    opt.step()
                    for p, p0 in zip(model.parameters(), before):
                        assert torch.equal(p.detach(), p0)
                    after = opt.state_dict()
                    for b, s in state_before["state"].items():
                        for k, v in s.items():
                            assert torch.equal(after["state"][b][k], v), (b, k)
        return model, opt

    clean_model, clean_opt = run(None)
    model, opt = run(poison_after=6)            # history exists at step 7 (pairs at 4, 6)
    c = opt.counters
    assert c["skipped_steps"] == 3 and c["step"] == len(data)
    assert clean_opt.counters["skipped_steps"] == 0
    for p, q in zip(clean_model.parameters(), model.parameters()):
        assert torch.equal(p, q)                # a skipped step is a pure no-op
    for b in opt.owned_blocks:
        state = opt.block_state(b)
        assert all(torch.isfinite(state[k]).all() for k in ("S", "Y", "rho", "gamma"))


def test_closure_is_called_and_its_loss_returned() -> None:
    p = nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (p ** 2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(5.0)
    torch.testing.assert_close(p.detach(), torch.tensor([0.8, -1.6], dtype=F64))


# ---- the SGD fall-back and the KL guard ----------------------------------------------------
def _install_pair(opt: MLBFGS, s: torch.Tensor, y: torch.Tensor, rho: float,
                  gamma: float) -> None:
    """Put one (possibly invalid) pair into block 0's ring through load_state_dict."""
    sd = opt.state_dict()
    st = sd["state"][0]
    st["S"][0] = s
    st["Y"][0] = y
    st["rho"][0] = rho
    st["gamma"].fill_(gamma)
    st["head"].fill_(1)
    st["count"].fill_(1)
    opt.load_state_dict(sd)


@pytest.mark.parametrize("case", ["negative-curvature", "non-finite"])
def test_sgd_fallback_when_direction_is_not_descent(case: str) -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    if case == "negative-curvature":
        _install_pair(opt, e1, -e1, rho=-1.0, gamma=-1.0)   # H = −I: gᵀHg < 0
    else:
        _install_pair(opt, e1, e1, rho=math.inf, gamma=1.0)  # H·g non-finite
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 1
    assert opt.counters["last_nu"] == 1.0
    assert torch.equal(p.detach(), -(g * 0.1))              # d = g
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 2


def test_good_curvature_is_not_a_fallback() -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=0.1, momentum=0.0, update_freq=1000, clip="none")
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    _install_pair(opt, e1, 2 * e1, rho=0.5, gamma=0.5)      # H = ½ I
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    assert opt.counters["sgd_fallbacks"] == 0
    torch.testing.assert_close(p.detach(), -(0.1 * 0.5 * g))


def test_kl_guard_value() -> None:
    p = nn.Parameter(torch.zeros(4, dtype=F64))
    opt = MLBFGS([p], lr=1.0, momentum=0.0, update_freq=1000, clip="kl", kl_clip=0.01)
    e1 = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64)
    _install_pair(opt, e1, 2 * e1, rho=0.5, gamma=0.5)      # H = ½ I, gᵀd = ½‖g‖²
    g = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=F64)
    p.grad = g.clone()
    opt.step()
    nu = math.sqrt(0.01 / (0.5 * float(g @ g)))
    assert opt.counters["last_nu"] == pytest.approx(nu, rel=1e-12)
    torch.testing.assert_close(p.detach(), -(nu * 0.5 * g))


# ---- gradients and pairs -------------------------------------------------------------------
def test_huge_but_finite_gradient_is_not_skipped() -> None:
    """The finiteness check must not mistake an overflowing sum of finite entries for NaN."""
    p = nn.Parameter(torch.zeros(4))
    opt = MLBFGS([p], lr=0.0)
    p.grad = torch.full((4,), 3e38)                        # finite; the float32 sum is inf
    opt.step()
    assert opt.counters["skipped_steps"] == 0 and opt.counters["step"] == 1
    p.grad = torch.tensor([3e38, -3e38, math.inf, 0.0])   # one Inf entry: skipped
    opt.step()
    assert opt.counters["skipped_steps"] == 1


def test_pair_momentum_offers_the_ema_of_successive_pairs() -> None:
    """``pair_momentum=p``: the pair offered at the k-th pair step is s̄ₖ = p·s̄ₖ₋₁ + (1−p)·sₖ
    (s̄₁ = s₁), sₖ = Mθ − snapshot as without it; on a quadratic ȳ = A·s̄ is accepted, and the
    ring's newest row is s̄ₖ. The default (0) offers the raw pairs."""
    n, period, beta, p = 6, 2, 0.9, 0.5
    gen = torch.Generator().manual_seed(7)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    hessian = basis @ torch.diag(torch.linspace(0.5, 2.0, n, dtype=torch.float64)) @ basis.T
    target = torch.randn(n, generator=gen, dtype=torch.float64)
    for pair_momentum in (p, 0.0):
        theta = nn.Parameter(torch.zeros(n, dtype=torch.float64))
        opt = MLBFGS([theta], lr=0.1, update_freq=period, beta_param=beta, beta_grad=beta,
                     damping=0.0, momentum=0.0, pair_momentum=pair_momentum)
        smoothed: torch.Tensor | None = None
        offered = 0
        for t in range(1, 6 * period + 1):
            state = opt.block_state(0)
            m_param = (theta.detach().clone() if t == 1 else
                       state["m_param"].clone().lerp_(theta.detach(), 1.0 - beta))
            snapshot = state["snap_param"].clone()
            theta.grad = hessian @ theta.detach() - target
            opt.step()
            if t % period or t < 2 * period:
                continue
            raw = m_param - snapshot
            smoothed = raw if smoothed is None else smoothed * p + raw * (1.0 - p)
            offered += 1
            curvature = opt._stochastic.curvature[0]
            newest = (int(curvature.head) - 1) % curvature.history_size
            expected = smoothed if pair_momentum else raw
            torch.testing.assert_close(curvature.S[newest], expected, rtol=1e-12, atol=1e-14)
        assert offered == 5 and opt.counters["accepted_pairs"] == 5
        assert not torch.allclose(smoothed, raw)   # the EMA did differ from the raw pair
