"""``MLBFGS(..., lr=1, line_search_fn="strong_wolfe")`` and ``step(closure)``, one process.

The reference is ``torch.optim.LBFGS`` with the same settings: the same iteration (pairs from
consecutive iterates, γ = sᵀy/yᵀy, the same strong-Wolfe search and stopping rules), so on the
same closure from the same start both spend the same closure evaluations and reach the same
losses. They differ in rounding only (the compact form against torch's two-loop recursion).
Multi-rank runs: tests/test_searched_mpi.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from mlbfgs_hpc import MLBFGS, build_blocks
from mlbfgs_hpc.checkpoint import load_checkpoint, save_checkpoint
from mlbfgs_hpc.comm import LocalCommunicator
from mlbfgs_hpc.config import SEARCHED_DEFAULTS, default_max_eval


def regression() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=gen, dtype=torch.float64)
    y = torch.tanh(x @ torch.randn(8, 1, generator=gen, dtype=torch.float64))
    return x, y + 0.05 * torch.randn(256, 1, generator=gen, dtype=torch.float64)


def model_of(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1)).double()


def closure_for(model: nn.Module, optimizer: torch.optim.Optimizer,
                data: tuple[torch.Tensor, torch.Tensor]):
    x, y = data

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        return loss.detach()
    return closure


def searched(model: nn.Module, **kw: object) -> MLBFGS:
    return MLBFGS(model.parameters(), blocks=build_blocks(model), line_search_fn="strong_wolfe",
                  grad_backend=None, **kw)  # type: ignore[arg-type]


def torch_evals(optimizer: torch.optim.LBFGS) -> int:
    return int(optimizer.state[optimizer.param_groups[0]["params"][0]]["func_evals"])


@pytest.mark.parametrize("max_iter", [1, 20])
def test_same_iteration_as_torch_lbfgs(max_iter: int) -> None:
    data = regression()
    ours_model, torch_model = model_of(), model_of()
    ours = searched(ours_model, lr=1.0, max_iter=max_iter)
    # (max_eval: torch's default for max_iter > 1; for one iteration MLBFGS's default gives
    # the search its own 25 evaluations, torch's would give it none.)
    reference = torch.optim.LBFGS(torch_model.parameters(), lr=1.0, max_iter=max_iter,
                                  max_eval=default_max_eval(max_iter), history_size=100,
                                  line_search_fn="strong_wolfe")
    ours_closure = closure_for(ours_model, ours, data)
    torch_closure = closure_for(torch_model, reference, data)
    steps = 6 if max_iter == 20 else 40
    initial = float(ours_closure())
    for step in range(steps):
        ours_loss = float(ours.step(ours_closure))
        torch_loss = float(reference.step(torch_closure))
        assert ours_loss == pytest.approx(torch_loss, rel=1e-6), step
        assert ours.counters["func_evals"] == torch_evals(reference), step
    assert float(ours_closure()) < 0.05 * initial   # it did optimise: the loss fell a lot


def test_a_user_passes_only_lr_and_line_search_fn() -> None:
    opt = MLBFGS(model_of().parameters(), lr=1, line_search_fn="strong_wolfe")
    cfg = opt.config
    assert (cfg.history_size, cfg.update_freq, cfg.beta_param, cfg.beta_grad, cfg.damping,
            cfg.sigma_low, cfg.sigma_high, cfg.double_damping, cfg.clip) == (
        100, 1, 0.0, 0.0, 0.0, 0.0, math.inf, 0.0, "none")
    assert opt.param_groups[0]["momentum"] == 0.0 == SEARCHED_DEFAULTS["momentum"]
    assert opt.line_search is not None and (opt.line_search.max_iter,
                                            opt.line_search.max_eval) == (20, 25)
    assert MLBFGS(model_of().parameters(), line_search_fn="strong_wolfe").defaults["lr"] == 1.0
    # Without a line search, nothing changed.
    plain = MLBFGS(model_of().parameters())
    assert (plain.config.update_freq, plain.config.clip, plain.defaults["lr"],
            plain.defaults["momentum"]) == (50, "graft", 0.1, 0.9)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"clip": "graft"}, "^clip must be 'none' with line_search_fn"),
    ({"momentum": 0.9}, "^momentum must be 0 with line_search_fn"),
    ({"weight_decay": 1e-4}, "^weight_decay must be 0 with line_search_fn"),
    ({"max_grad_norm": 1.0}, "^max_grad_norm must be None with line_search_fn"),
    ({"double_damping": 0.2}, "^double_damping must be 0 with line_search_fn"),
    ({"line_search_fn": "backtracking"}, "^line_search_fn must be"),
    ({"max_iter": 0}, "^max_iter must be an integer >= 1"),
])
def test_options_that_make_no_sense_with_a_search_are_refused(kwargs: dict[str, object],
                                                              match: str) -> None:
    args = {"line_search_fn": "strong_wolfe", **kwargs}
    with pytest.raises(ValueError, match=match):
        MLBFGS(model_of().parameters(), **args)  # type: ignore[arg-type]


def test_iteration_arguments_need_a_line_search_and_step_needs_a_closure() -> None:
    with pytest.raises(ValueError, match="max_iter only apply with line_search_fn"):
        MLBFGS(model_of().parameters(), max_iter=5)
    opt = searched(model_of())
    with pytest.raises(ValueError, match=r"needs step\(closure\)"):
        opt.step()
    groups = [{"params": [p], "lr": 1.0 + i} for i, p in enumerate(model_of().parameters())]
    opt = MLBFGS(groups, line_search_fn="strong_wolfe", grad_backend=None)
    with pytest.raises(ValueError, match="same lr"):
        opt.step(lambda: torch.zeros(()))


def test_a_non_finite_start_skips_the_step_and_leaves_the_parameters() -> None:
    model = model_of()
    opt = searched(model)
    before = [p.detach().clone() for p in model.parameters()]

    def poisoned() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.full((4, 8), math.nan, dtype=torch.float64)).sum()
        loss.backward()
        return loss.detach()

    assert math.isnan(float(opt.step(poisoned)))
    assert opt.counters["skipped_steps"] == 1 and opt.counters["step"] == 0
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


def run_steps(model: nn.Module, opt: MLBFGS, steps: int) -> None:
    closure = closure_for(model, opt, regression())
    for _ in range(steps):
        opt.step(closure)


@pytest.mark.parametrize("betas", [0.0, 0.5])   # iterate pairs; momentum pairs
def test_state_dict_resumes_bit_for_bit(betas: float) -> None:
    kw = {"max_iter": 3, "beta_param": betas, "beta_grad": betas}
    straight_model = model_of()
    straight = searched(straight_model, **kw)
    run_steps(straight_model, straight, 8)

    first_model = model_of()
    first = searched(first_model, **kw)
    run_steps(first_model, first, 4)
    saved_state = first.state_dict()
    saved_params = {k: v.clone() for k, v in first_model.state_dict().items()}
    resumed_model = model_of(seed=99)        # another init: everything comes from the state
    resumed_model.load_state_dict(saved_params)
    resumed = searched(resumed_model, **kw)
    resumed.load_state_dict(saved_state)
    run_steps(resumed_model, resumed, 4)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)
    assert resumed.counters == straight.counters


def test_hdf5_checkpoint_resumes_bit_for_bit(tmp_path: Path) -> None:
    comm = LocalCommunicator()
    straight_model = model_of()
    straight = searched(straight_model, max_iter=2)
    run_steps(straight_model, straight, 6)

    model = model_of()
    opt = searched(model, max_iter=2)
    run_steps(model, opt, 3)
    path = save_checkpoint(tmp_path, step=3, model=model, optimizer=opt, comm=comm)
    resumed_model = model_of(seed=7)
    resumed = searched(resumed_model, max_iter=2)
    load_checkpoint(path, model=resumed_model, optimizer=resumed, comm=comm)
    run_steps(resumed_model, resumed, 3)
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


def test_the_two_modes_do_not_load_each_others_state() -> None:
    model = model_of()
    plain_state = MLBFGS(model.parameters(), blocks=build_blocks(model)).state_dict()
    with pytest.raises(ValueError, match="saved without line_search_fn"):
        searched(model).load_state_dict(plain_state)
    with pytest.raises(ValueError, match="saved with line_search_fn"):
        MLBFGS(model.parameters(), blocks=build_blocks(model)).load_state_dict(
            searched(model).state_dict())


def test_idle_and_frozen_parameters_stay_where_they_are() -> None:
    # torch's rule under the search too: a parameter without a gradient, or frozen at step
    # time, is not moved (the history's other coordinates do not leak into it).
    data = regression()
    model = model_of()
    head = nn.Linear(8, 1).double()            # never used by the loss: .grad stays None
    frozen = model[2]                           # frozen from the third step on
    opt = MLBFGS([*model.parameters(), *head.parameters()], line_search_fn="strong_wolfe",
                 max_iter=3, grad_backend=None)
    closure = closure_for(model, opt, data)
    head_before = [p.detach().clone() for p in head.parameters()]
    first_before = model[0].weight.detach().clone()
    for step in range(6):
        if step == 2:
            for p in frozen.parameters():
                p.requires_grad_(False)
            frozen_before = [p.detach().clone() for p in frozen.parameters()]
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(head.parameters(), head_before))
    assert all(torch.equal(p, q) for p, q in zip(frozen.parameters(), frozen_before))
    assert not torch.equal(model[0].weight, first_before)   # and the rest trained


def test_a_diverged_searched_run_stops() -> None:
    from mlbfgs_hpc import TrainingDivergedError
    model = model_of()
    opt = MLBFGS(model.parameters(), line_search_fn="strong_wolfe", max_consecutive_skips=3,
                 grad_backend=None)

    def poisoned() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.full((4, 8), math.nan, dtype=torch.float64)).sum()
        loss.backward()
        return loss.detach()

    for _ in range(2):   # skipped, then the third in a row stops the run
        opt.step(poisoned)
    assert opt.counters["skipped_steps"] == 2
    with pytest.raises(TrainingDivergedError, match="non-finite at 3 steps in a row"):
        opt.step(poisoned)


def test_a_copy_of_a_searched_optimizer_continues_bit_for_bit() -> None:
    import copy
    model = model_of()
    opt = searched(model, max_iter=2)
    run_steps(model, opt, 3)
    twin_model = copy.deepcopy(model)
    twin = copy.deepcopy(opt)
    # The copy optimises its own parameters: rebind it to the copied model's.
    twin_state = twin.state_dict()
    twin = searched(twin_model, max_iter=2)
    twin.load_state_dict(twin_state)
    run_steps(model, opt, 2)
    run_steps(twin_model, twin, 2)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin_model.parameters()))


class _FlatLoss(torch.autograd.Function):
    """A loss whose value never changes but whose gradient says it descends: what a float32
    loss looks like at its rounding floor, with nothing below the start along any direction."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:   # type: ignore[override]
        ctx.save_for_backward(x)
        return torch.ones((), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:   # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_out * torch.ones_like(x)


def test_a_search_with_nothing_lower_leaves_the_parameters_and_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    weight = nn.Parameter(torch.linspace(-1.0, 1.0, 6))
    model = nn.Module()
    model.weight = weight
    opt = searched(model)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _FlatLoss.apply(weight)
        loss.backward()
        return loss.detach()

    before = weight.detach().clone()
    with caplog.at_level("WARNING", logger="mlbfgs_hpc.searched"):
        for _ in range(3):
            opt.step(closure)
    assert torch.equal(weight.detach(), before)
    assert float(opt.counters["last_step_length"]) == 0.0
    warnings = [r for r in caplog.records if "found no loss below" in r.getMessage()]
    assert len(warnings) == 1 and "float64 parameters remove this floor" in \
        warnings[0].getMessage()
