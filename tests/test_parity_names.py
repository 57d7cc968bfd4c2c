"""Checkpoint names do not depend on how the model is wrapped (issue 35, item 3).

``torch.compile`` (the real compiler, inductor on this CPU) names every parameter
``_orig_mod.<name>`` and DDP ``module.<name>``; the optimizer's blocks and the HDF5
checkpoints use the names of the model inside, so state saved with one wrapping loads with
another, both ways, and training continues bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
import torch.distributed as dist
from torch import nn

from mlbfgs_hpc import MLBFGS, LocalCommunicator, build_blocks
from mlbfgs_hpc import checkpoint as ckpt
from mlbfgs_hpc.checkpoint.h5io import sha256_file
from mlbfgs_hpc.naming import canonical_name, canonical_state_dict, unwrap_model
from tests.optimizer_problems import batches, make_mlp


def make_opt(model: nn.Module) -> MLBFGS:
    return MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.1, update_freq=2,
                  history_size=3)


def train(model: nn.Module, opt: MLBFGS, data: list[tuple[torch.Tensor, torch.Tensor]]
          ) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_canonical_names() -> None:
    assert canonical_name("_orig_mod.fc.weight") == "fc.weight"
    assert canonical_name("enc._orig_mod.layer.weight") == "enc.layer.weight"
    assert canonical_name("module.fc.weight") == "module.fc.weight"   # only by unwrapping DDP
    inner = nn.Sequential(nn.Linear(2, 2))
    assert unwrap_model(inner) is inner


@pytest.mark.timeout(600)
def test_compiled_model_state_loads_into_the_plain_model_and_back(tmp_path: Path) -> None:
    """Train a ``torch.compile``d MLP 10 steps; its optimizer state (state_dict, and an HDF5
    checkpoint) loads into a plain model's optimizer, which continues exactly as the
    compiled run does from there; and a plain run's state loads into a compiled model's."""
    data = batches(16)
    compiled_model = torch.compile(make_mlp(0))
    assert [n for n, _ in compiled_model.named_parameters()][0] == "_orig_mod.0.weight"
    compiled_opt = make_opt(compiled_model)
    assert [n for b in compiled_opt.blocks for n in b.param_names][0] == "0.weight"
    train(compiled_model, compiled_opt, data[:10])
    comm = LocalCommunicator()
    path = ckpt.save_checkpoint(tmp_path / "run", step=10, model=compiled_model,
                                optimizer=compiled_opt, comm=comm)
    state = compiled_opt.state_dict()
    params = {n: p.detach().clone() for n, p in canonical_state_dict(compiled_model).items()}

    for load in ("state_dict", "hdf5"):
        plain = make_mlp(99)
        plain_opt = make_opt(plain)
        if load == "state_dict":
            plain.load_state_dict(params)
            plain_opt.load_state_dict(state)
        else:
            ckpt.load_checkpoint(path, model=plain, optimizer=plain_opt, comm=comm)
        assert all(torch.equal(p, params[n]) for n, p in plain.named_parameters())
        train(plain, plain_opt, data[10:])
        if load == "state_dict":
            continued = {n: p.detach().clone() for n, p in plain.named_parameters()}
        else:
            assert all(torch.equal(p, continued[n]) for n, p in plain.named_parameters())

    # ... and back: a plain run's checkpoint into a compiled model.
    back = torch.compile(make_mlp(7))
    back_opt = make_opt(back)
    plain = make_mlp(0)
    plain_opt = make_opt(plain)
    train(plain, plain_opt, data[:10])
    path = ckpt.save_checkpoint(tmp_path / "plain", step=10, model=plain, optimizer=plain_opt,
                                comm=comm)
    ckpt.load_checkpoint(path, model=back, optimizer=back_opt, comm=comm)
    back_opt.load_state_dict(plain_opt.state_dict())
    train(back, back_opt, data[10:])
    train(plain, plain_opt, data[10:])
    for (n, p), (m, q) in zip(canonical_state_dict(back).items(),
                              canonical_state_dict(plain).items()):
        assert n == m
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)  # compiled kernels round


def test_checkpoint_written_with_orig_mod_names_still_loads(tmp_path: Path) -> None:
    """A checkpoint written before names were canonical (a compiled model's ``_orig_mod.``
    names in the model and block tables) loads into the plain model."""
    model = make_mlp(0)
    opt = make_opt(model)
    train(model, opt, batches(4))
    comm = LocalCommunicator()
    path = ckpt.save_checkpoint(tmp_path / "run", step=4, model=model, optimizer=opt, comm=comm)
    manifest_path = path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["model"]:
        entry["name"] = "_orig_mod." + entry["name"]
    for block in manifest["blocks"]:
        block["name"] = "_orig_mod." + block["name"]
        block["param_names"] = ["_orig_mod." + n for n in block["param_names"]]
    common = path / "common.h5"
    with h5py.File(common, "r+") as f:
        for name in list(f["model"]):
            f["model"].move(name, "_orig_mod." + name)
    manifest["files"]["common.h5"].update(bytes=common.stat().st_size,
                                          sha256=sha256_file(common))
    manifest_path.write_text(json.dumps(manifest))
    fresh = make_mlp(5)
    fresh_opt = make_opt(fresh)
    ckpt.load_checkpoint(path, model=fresh, optimizer=fresh_opt, comm=comm)
    assert all(torch.equal(p, q) for p, q in zip(fresh.parameters(), model.parameters()))
    assert fresh_opt.counters["step"] == 4


def test_ddp_wrapped_model_has_the_plain_names(tmp_path: Path) -> None:
    """DistributedDataParallel (one gloo process) names parameters ``module.*``; blocks and
    checkpoints use the plain names, and its state loads into a plain model's optimizer."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(make_mlp(0))
        assert next(iter(dict(wrapped.named_parameters()))) == "module.0.weight"
        opt = make_opt(wrapped)
        plain = make_mlp(0)
        assert [(b.name, b.param_names) for b in opt.blocks] == \
            [(b.name, b.param_names) for b in build_blocks(plain)]
        train(wrapped, opt, batches(6))
        comm = LocalCommunicator()
        path = ckpt.save_checkpoint(tmp_path / "run", step=6, model=wrapped, optimizer=opt,
                                    comm=comm)
        plain_opt = make_opt(plain)
        ckpt.load_checkpoint(path, model=plain, optimizer=plain_opt, comm=comm)
        assert all(torch.equal(p, q) for p, q in zip(plain.parameters(),
                                                     wrapped.module.parameters()))
        assert plain_opt.counters == {**opt.counters, "last_gamma": plain_opt.counters[
            "last_gamma"]}
    finally:
        dist.destroy_process_group()

