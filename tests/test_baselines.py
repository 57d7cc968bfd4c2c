"""The peers ``mlbfgs-train`` builds besides mL-BFGS (``mlbfgs_hpc.baselines``): which
parameters Muon takes, the Muon + AdamW optimizer under an LR schedule and a state-dict round
trip, the per-optimizer flag defaults (torch's for muon and adamw), and the resume rule with
two peak lrs. Checkpoint/resume of both through HDF5 is in ``test_checkpoint.py`` and, on
real ``mlbfgs-train`` runs, ``test_run_dir.py``."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mlbfgs_hpc import runconfig
from mlbfgs_hpc.baselines import MuonWithAdamW, build_baseline, muon_param_split
from mlbfgs_hpc.models import build_model
from mlbfgs_hpc.options import build_parser, resolve_optimizer_defaults


def _split_names(model: nn.Module) -> tuple[list[str], list[str]]:
    muon, adamw = muon_param_split(model)
    return [n for n, _ in muon], [n for n, _ in adamw]


def test_muon_takes_the_hidden_matrices_of_the_cnn_only() -> None:
    model = build_model("cnn", in_shape=(1, 28, 28), num_classes=10)
    muon, adamw = _split_names(model)
    assert muon == ["classifier.1.weight"]
    # Conv filters (4-D), biases and the output layer go to AdamW.
    assert adamw == ["features.0.weight", "features.0.bias", "features.3.weight",
                     "features.3.bias", "classifier.1.bias", "classifier.3.weight",
                     "classifier.3.bias"]


def test_muon_split_of_the_transformer_leaves_embeddings_norms_and_head_to_adamw() -> None:
    model = build_model("transformer", in_shape=(16,), num_classes=32, width=16, depth=2)
    muon, adamw = _split_names(model)
    assert muon == [f"layers.{i}.{w}.weight" for i in range(2)
                    for w in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    assert {"tok_emb.weight", "pos_emb.weight", "head.weight", "head.bias",
            "ln_f.weight"} <= set(adamw)
    assert all(p.dim() == 2 for _, p in muon_param_split(model)[0])
    assert not any(n.endswith(".weight") and ".attn." in n for n in adamw)


def test_muon_refuses_a_model_without_hidden_linear_layers() -> None:
    model = build_model("linear", in_shape=(1, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match="at least one 2-D weight of a hidden layer"):
        build_baseline("muon", model=model, params=list(model.parameters()), lr=0.02,
                       adamw_lr=1e-3, momentum=0.95, nesterov=True, weight_decay=None)


def _muon_mlp() -> tuple[nn.Module, MuonWithAdamW]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                          nn.Linear(8, 3))
    optimizer = build_baseline("muon", model=model, params=list(model.parameters()), lr=0.02,
                               adamw_lr=4e-3, momentum=0.95, nesterov=True, weight_decay=None)
    assert isinstance(optimizer, MuonWithAdamW)
    return model, optimizer


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: object,
           n: int) -> None:
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 5, generator=generator), torch.randint(0, 3, (16,),
                                                                        generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


def test_muon_with_adamw_defaults_schedule_and_state_round_trip() -> None:
    model, optimizer = _muon_mlp()
    roles = [(g["role"], g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
    assert roles == [("muon", 0.02, 0.1), ("adamw", 4e-3, 0.01)]  # torch's defaults
    assert optimizer.muon.param_groups[0]["momentum"] == 0.95
    assert optimizer.muon.param_groups[0]["nesterov"] is True
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.5, total_iters=4)
    _steps(model, optimizer, scheduler, 2)
    # The schedule reaches both halves (the inner optimizers' own groups).
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.75)
    assert optimizer.adamw.param_groups[0]["lr"] == pytest.approx(4e-3 * 0.75)
    saved = copy.deepcopy(optimizer.state_dict())
    saved_sched = scheduler.state_dict()
    assert set(saved) == {"muon", "adamw"} and saved["muon"]["state"]

    model2 = copy.deepcopy(model)
    muon, adamw = muon_param_split(model2)
    assert [n for n, _ in muon] == ["0.weight", "2.weight"]
    optimizer2 = MuonWithAdamW(muon_params=[p for _, p in muon],
                               adamw_params=[p for _, p in adamw], lr=1.0, adamw_lr=1.0)
    scheduler2 = torch.optim.lr_scheduler.LinearLR(optimizer2, start_factor=0.5, total_iters=4)
    optimizer2.load_state_dict(saved)
    scheduler2.load_state_dict(saved_sched)
    # Loading relinks the groups: the scheduler now drives the loaded ones.
    assert [g["lr"] for g in optimizer2.param_groups] == [g["lr"] for g in
                                                          optimizer.param_groups]
    _steps(model, optimizer, scheduler, 3)
    _steps(model2, optimizer2, scheduler2, 3)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="not a MuonWithAdamW state dict"):
        optimizer2.load_state_dict(torch.optim.SGD(model2.parameters()).state_dict())


@pytest.mark.parametrize(("optimizer", "expected"), [
    ("sgd", (0.9, False, 0.0, None)), ("mlbfgs", (0.9, False, 0.0, None)),
    ("adamw", (0.9, False, 0.01, None)), ("muon", (0.95, True, None, 1e-3)),
])
def test_flag_defaults_depend_on_the_optimizer(optimizer: str,
                                               expected: tuple[object, ...]) -> None:
    args = resolve_optimizer_defaults(build_parser().parse_args(["--optimizer", optimizer]))
    assert (args.momentum, args.nesterov, args.weight_decay, args.muon_adamw_lr) == expected
    given = resolve_optimizer_defaults(build_parser().parse_args(
        ["--optimizer", optimizer, "--momentum", "0.5", "--no-nesterov", "--weight-decay",
         "0.2"]))
    assert (given.momentum, given.nesterov, given.weight_decay) == (0.5, False, 0.2)


def test_resume_replans_each_half_from_its_own_peak_lr() -> None:
    _, optimizer = _muon_mlp()

    def build(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    scheduler = build(optimizer)
    changes = runconfig.apply_on_resume(
        {"steps": 10, "muon_adamw_lr": 4e-3}, {"steps": 20, "muon_adamw_lr": 8e-3},
        optimizer=optimizer, scheduler=scheduler, step=5, total_steps=20, lr=0.02,
        group_lrs=optimizer.peak_lrs(lr=0.02, adamw_lr=8e-3), build_scheduler=build,
        report=False)
    assert sorted(c.key for c in changes) == ["muon_adamw_lr", "steps"]
    reference = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": 0.02},
                                 {"params": [torch.zeros(1)], "lr": 8e-3}])
    planned = build(reference)
    for _ in range(5):
        reference.step()
        planned.step()
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in
                                                         reference.param_groups]


def test_muon_without_momentum_drops_nesterov_unless_asked() -> None:
    args = resolve_optimizer_defaults(build_parser().parse_args(
        ["--optimizer", "muon", "--momentum", "0"]))
    assert (args.momentum, args.nesterov) == (0.0, False)
