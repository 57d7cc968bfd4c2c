"""Single-process tests of ``mlbfgs_hpc.checkpoint`` and the ``mlbfgs-ckpt`` tool.

Real files, real HDF5, real training: bit-identical resume (model, optimizer, scheduler and
all RNG states), torch baseline optimizers, the directory protocol (``latest``, ``keep``),
integrity (flipped byte, truncated or missing shard, bad schema), clear mismatch errors, a
process killed by SIGKILL while writing, and every tool subcommand.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from mlbfgs_hpc import MLBFGS, LocalCommunicator, build_blocks
from mlbfgs_hpc import checkpoint as ckpt
from mlbfgs_hpc.baselines import build_baseline
from tests.ckpt_helpers import TOOL, Stateful, flip_byte_in_dataset, tool_main
from tests.mpi_helpers import load_module

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mpi_scripts" / "ckpt_worker.py"
PYTHON = sys.executable


worker = load_module("ckpt_worker", WORKER)


def params_npz(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "params.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def record(out: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((out / f"rank{rank}.json").read_text())


# ---- small models trained in-process ---------------------------------------------------------
def make_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.BatchNorm1d(12),
                               torch.nn.Tanh(), torch.nn.Linear(12, 3))


def make_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "mlbfgs":
        return MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05, update_freq=2,
                      history_size=3, comm=LocalCommunicator())
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.01, amsgrad=True)
    if kind == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    if kind == "muon":  # Muon on the hidden Linear's weight, AdamW on the rest (BN included)
        return build_baseline("muon", model=model, params=list(model.parameters()), lr=0.02,
                              adamw_lr=0.01, momentum=0.95, nesterov=True, weight_decay=None)
    if kind == "lbfgs":
        return torch.optim.LBFGS(model.parameters(), lr=0.5, history_size=4, max_iter=3)
    raise AssertionError(kind)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int,
          scheduler: Any = None) -> None:
    """Steps on fresh random batches from the global torch RNG (so RNG restore matters)."""
    for _ in range(steps):
        x = torch.randn(32, 6)
        y = torch.randint(0, 3, (32,))

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        optimizer.step(closure)
        if scheduler is not None:
            scheduler.step()


def save(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         **kw: Any) -> Path:
    return ckpt.save_checkpoint(run, step=step, model=model, optimizer=optimizer,
                                comm=LocalCommunicator(), **kw)


def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         **kw: Any) -> ckpt.LoadedCheckpoint:
    return ckpt.load_checkpoint(path, model=model, optimizer=optimizer,
                                comm=LocalCommunicator(), **kw)


def assert_state_equal(a: Any, b: Any, where: str = "") -> None:
    """Nested equality, tensors bitwise (NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: {a.keys()} {b.keys()}"
        for key in a:
            assert_state_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_state_equal(x, y, f"{where}/{i}")
    else:
        assert a == b or (a != a and b != b), f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def mlbfgs_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory with mL-BFGS checkpoints at steps 4 and 8 (pairs in the history)."""
    run = tmp_path_factory.mktemp("run")
    model = make_bn_model()
    optimizer = make_optimizer("mlbfgs", model)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    for step in (4, 8):
        train(model, optimizer, 4, scheduler)
        save(run, step, model, optimizer, scheduler=scheduler, extra={"step": step})
    return run


@pytest.fixture()
def run_copy(mlbfgs_ckpt: Path, tmp_path: Path) -> Path:
    """A private copy of ``mlbfgs_ckpt`` that a test may damage."""
    return Path(shutil.copytree(mlbfgs_ckpt, tmp_path / "run"))




# ---- bit-identical resume ------------------------------------------------------------------------
def test_resume_one_rank_is_bit_identical(tmp_path: Path) -> None:
    """Save at 10, restart from it, run to 20: identical to the uninterrupted run to 20."""
    common = ["--steps", "20", "--dropout", "0.2"]
    worker.run(["--run-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref_out"),
                "--save-at", "10,20", *common])
    worker.run(["--run-dir", str(tmp_path / "res"), "--out", str(tmp_path / "res_out"),
                "--resume", str(tmp_path / "ref" / "checkpoints" / "step-000010"),
                "--save-at", "20", *common])
    ref, res = params_npz(tmp_path / "ref_out"), params_npz(tmp_path / "res_out")
    assert ref.keys() == res.keys()
    for name in ref:
        assert np.array_equal(ref[name], res[name]), name
    a, b = record(tmp_path / "ref_out"), record(tmp_path / "res_out")
    assert a["counters"] == b["counters"] and a["counters"]["accepted_pairs"] > 0
    assert a["final_lr"] == b["final_lr"]
    assert a["probes"]["10"] == b["probes"]["10"]  # torch RNG stream restored
    # The whole saved state at step 20 (optimizer blocks, counters, scheduler) is identical.
    assert tool_main(["diff", str(tmp_path / "ref"), str(tmp_path / "res")]) == 0


@pytest.mark.parametrize("kind", ["mlbfgs", "sgd", "adam", "adamw", "lbfgs", "muon"])
def test_optimizers_buffers_and_scheduler_resume_exactly(kind: str, tmp_path: Path) -> None:
    """Every optimizer kind (MLBFGS blocks, torch state dicts) and BatchNorm buffers."""
    model = make_bn_model()
    optimizer = make_optimizer(kind, model)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9)
    train(model, optimizer, 5, scheduler)
    path = save(tmp_path, 5, model, optimizer, scheduler=scheduler, extra={"epoch": 2})
    saved_opt = copy.deepcopy(optimizer.state_dict())  # torch returns live tensors
    train(model, optimizer, 4, scheduler)
    reference = {k: v.clone() for k, v in model.state_dict().items()}

    model2 = make_bn_model()
    optimizer2 = make_optimizer(kind, model2)
    scheduler2 = torch.optim.lr_scheduler.ExponentialLR(optimizer2, gamma=0.9)
    loaded = load(path, model2, optimizer2, scheduler=scheduler2)
    assert loaded.step == 5 and loaded.extra == {"epoch": 2} and loaded.world_size == 1
    assert_state_equal(optimizer2.state_dict(), saved_opt, "optimizer")
    train(model2, optimizer2, 4, scheduler2)
    assert_state_equal(model2.state_dict(), reference, "model")  # incl. BN running stats
    assert scheduler2.state_dict() == scheduler.state_dict()
    assert ckpt.verify_checkpoint(path) == []


def test_nested_state_round_trip_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """Odd-but-legal state: int/tuple keys, NaN, None, bf16/bool/empty/0-d tensors, '/' keys;
    saving and loading must never call pickle (or torch.save/torch.load)."""

    state = {"ints": {0: torch.arange(3), 7: None}, (1, "a"): [1.5, float("nan"), -math_inf()],
             "a/b": torch.tensor(2.5, dtype=torch.bfloat16), "mask": torch.tensor([True, False]),
             "empty": torch.zeros(0, 3), "scalar": torch.tensor(3, dtype=torch.int64),
             "__tuple__": ("x", 2), "text": "ü", "flag": False}
    model = make_bn_model()
    optimizer = make_optimizer("adam", model)

    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("pickle used")

    for target, name in ((pickle, "dumps"), (pickle, "loads"), (pickle, "load"),
                         (pickle, "dump"), (torch, "save"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    path = save(tmp_path, 1, model, optimizer, scheduler=Stateful(state))
    restored = Stateful(None)
    load(path, make_bn_model(), make_optimizer("adam", make_bn_model()), scheduler=restored)
    monkeypatch.undo()
    assert_state_equal(restored.state, state, "state")


def math_inf() -> float:
    return float("inf")


# ---- files written by earlier versions ------------------------------------------------------
LEGACY = REPO / "tests" / "data" / "legacy-0.1.0"


def test_checkpoint_written_by_0_1_0_still_loads() -> None:
    """A 2-rank checkpoint written by the single-module checkpoint code of 0.1.0 (see
    tests/data/make_legacy_checkpoint.py) verifies and loads, on 1 rank, bit for bit."""
    legacy = load_module("make_legacy_checkpoint", LEGACY.parent / "make_legacy_checkpoint.py")
    expected = json.loads((LEGACY / "expected.json").read_text())
    assert ckpt.verify_checkpoint(LEGACY) == []
    model = legacy.build_model()
    optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05, update_freq=2,
                       history_size=2, comm=LocalCommunicator())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    loaded = ckpt.resume(LEGACY, model=model, optimizer=optimizer, comm=LocalCommunicator(),
                         scheduler=scheduler)
    assert loaded is not None and loaded.step == 6 and loaded.world_size == 2
    assert loaded.extra == {"epoch": 0, "batch_index": 6}
    for name, value in model.state_dict().items():
        assert torch.equal(value, torch.tensor(expected["params"][name])), name
    for key, value in expected["counters"].items():
        assert float(optimizer.counters[key]) == value, key
    assert scheduler.get_last_lr() == expected["lr"]


# ---- directory protocol ----------------------------------------------------------------------
def test_layout_manifest_latest_and_keep(tmp_path: Path) -> None:
    model = make_bn_model()
    optimizer = make_optimizer("mlbfgs", model)
    for step in range(1, 6):
        train(model, optimizer, 1)
        path = save(tmp_path, step, model, optimizer, keep=2, config={"lr": 0.05})
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000005"]
    assert (root / "latest").read_text() == "step-000005\n"
    assert ckpt.read_latest_pointer(tmp_path) == path == root / "step-000005"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == ckpt.SCHEMA_VERSION and manifest["world_size"] == 1
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["config"] == {"lr": 0.05} and manifest["step"] == 5
    assert [b["param_names"] for b in manifest["blocks"]] == [
        list(b.param_names) for b in optimizer.blocks]
    assert manifest["shards"][0]["blocks"] == [0, 1, 2]
    for name, info in manifest["files"].items():
        assert ckpt.h5io.sha256_file(path / name) == info["sha256"]
        assert (path / name).stat().st_size == info["bytes"]
    # Every dataset is chunked with fletcher32; no pickled or opaque data anywhere.
    checked = 0
    for name in manifest["files"]:
        with h5py.File(path / name, "r") as f:
            def visit(key: str, obj: Any) -> None:
                nonlocal checked
                if isinstance(obj, h5py.Dataset):
                    assert obj.fletcher32 and obj.chunks is not None, key
                    assert obj.dtype.kind in "biuf", key
                    checked += 1
            f.visititems(visit)
    assert checked > 40
    infos = ckpt.list_checkpoints(tmp_path)
    assert [(i.step, i.valid, i.latest) for i in infos] == [(4, True, False), (5, True, True)]


def test_saving_a_step_again_replaces_it(tmp_path: Path) -> None:
    model = make_bn_model()
    optimizer = make_optimizer("sgd", model)
    save(tmp_path, 3, model, optimizer, extra={"v": 1})
    path = save(tmp_path, 3, model, optimizer, extra={"v": 2})
    assert [i.path for i in ckpt.list_checkpoints(tmp_path)] == [path]
    assert json.loads((path / "manifest.json").read_text())["extra"] == {"v": 2}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_save_rejects_bad_arguments(tmp_path: Path) -> None:
    model = make_bn_model()
    optimizer = make_optimizer("sgd", model)
    with pytest.raises(ValueError, match="step must be an integer >= 0"):
        save(tmp_path, -1, model, optimizer)
    with pytest.raises(ValueError, match="keep must be an integer >= 1"):
        save(tmp_path, 1, model, optimizer, keep=0)
    with pytest.raises(ValueError, match="extra must hold only JSON values"):
        save(tmp_path, 1, model, optimizer, extra={"x": object()})
    assert not (tmp_path / "checkpoints").exists()


# ---- integrity -------------------------------------------------------------------------------------
def test_flipped_byte_is_detected_by_digest_and_fletcher32(run_copy: Path) -> None:
    path = run_copy / "checkpoints" / "step-000008"
    shard = path / "shard-00000-of-00001.h5"
    flip_byte_in_dataset(shard, "blocks/000000/S")
    problems = ckpt.verify_checkpoint(path)
    assert any("sha256" in p and str(shard) in p for p in problems), problems
    assert any("fletcher32" in p and "/blocks/000000/S" in p for p in problems), problems
    assert tool_main(["verify", str(path)]) == 1
    model = make_bn_model()
    with pytest.raises(ckpt.CheckpointCorruptError, match=str(shard)):
        load(path, model, make_optimizer("mlbfgs", model))
    # Even without the digest check, the dataset's own checksum refuses the damaged data.
    with pytest.raises(ckpt.CheckpointCorruptError, match="fletcher32"):
        load(path, model, make_optimizer("mlbfgs", model), verify_digests=False)


def test_truncated_shard_fails_verify_via_the_command_line(run_copy: Path) -> None:
    path = run_copy / "checkpoints" / "step-000008"
    shard = path / "shard-00000-of-00001.h5"
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    proc = subprocess.run([PYTHON, str(TOOL), "verify", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "truncated" in proc.stdout and str(shard) in proc.stdout


def test_auto_resume_skips_damaged_newest(run_copy: Path,
                                          caplog: pytest.LogCaptureFixture) -> None:
    newest = run_copy / "checkpoints" / "step-000008"
    (newest / "shard-00000-of-00001.h5").unlink()
    with caplog.at_level(logging.WARNING, logger="mlbfgs_hpc.checkpoint"):
        found = ckpt.find_latest_valid(run_copy)
    assert found == run_copy / "checkpoints" / "step-000004"
    assert any("skipping checkpoint" in r.message and "step-000008" in r.message
               and "is missing" in r.message for r in caplog.records)
    model = make_bn_model()
    optimizer = make_optimizer("mlbfgs", model)
    loaded = ckpt.resume(run_copy, model=model, optimizer=optimizer, comm=LocalCommunicator())
    assert loaded is not None and loaded.step == 4 and loaded.extra == {"step": 4}
    assert int(optimizer.state_dict()["global"]["step"]) == 4
    infos = {i.step: i for i in ckpt.list_checkpoints(run_copy)}
    assert infos[4].valid and not infos[8].valid and infos[8].latest
    # verify checks every checkpoint of a run: the damaged one fails it (exit 1).
    assert tool_main(["verify", str(run_copy)]) == 1


def test_missing_shard_error_names_the_file(run_copy: Path) -> None:
    path = run_copy / "checkpoints" / "step-000008"
    (path / "shard-00000-of-00001.h5").unlink()
    model = make_bn_model()
    with pytest.raises(ckpt.CheckpointCorruptError,
                       match=r"shard-00000-of-00001\.h5 is missing"):
        load(path, model, make_optimizer("mlbfgs", model))


def test_unknown_schema_version_is_refused(run_copy: Path) -> None:
    path = run_copy / "checkpoints" / "step-000008"
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    model = make_bn_model()
    with pytest.raises(ckpt.CheckpointSchemaError, match="unsupported checkpoint schema "
                       "version 99"):
        load(path, model, make_optimizer("mlbfgs", model))
    assert any("schema version 99" in p for p in ckpt.verify_checkpoint(path))
    assert ckpt.find_latest_valid(run_copy) == run_copy / "checkpoints" / "step-000004"


# ---- mismatches -------------------------------------------------------------------------------------
def test_model_and_optimizer_mismatches_are_named(mlbfgs_ckpt: Path) -> None:
    path = mlbfgs_ckpt / "checkpoints" / "step-000008"
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(6, 13), torch.nn.BatchNorm1d(13),
                                torch.nn.Tanh(), torch.nn.Linear(13, 3))
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"0\.weight: checkpoint \(12, 6\) vs model \(13, 6\)"):
        load(path, wider, make_optimizer("mlbfgs", wider))
    deeper = torch.nn.Sequential(*make_bn_model(), torch.nn.Linear(3, 3))
    with pytest.raises(ckpt.CheckpointMismatchError,
                       match=r"in the model but not in the checkpoint: 4\.weight, 4\.bias"):
        load(path, deeper, make_optimizer("mlbfgs", deeper))
    model = make_bn_model()
    with pytest.raises(ckpt.CheckpointMismatchError, match="holds the state of a .*MLBFGS"):
        load(path, model, make_optimizer("adam", model))
    other_m = MLBFGS(model.parameters(), blocks=build_blocks(model), history_size=5,
                     comm=LocalCommunicator())
    with pytest.raises(ckpt.CheckpointMismatchError, match="history_size=3"):
        load(path, model, other_m)
    # Nothing was modified by the refused loads.
    assert torch.equal(model.state_dict()["0.weight"], make_bn_model().state_dict()["0.weight"])


# ---- crash while writing ----------------------------------------------------------------------
def test_sigkill_while_writing_keeps_previous_checkpoint(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OMPI_COMM_WORLD_SIZE", None)
    proc = subprocess.Popen(
        [PYTHON, str(WORKER), "--run-dir", str(run), "--out", str(out), "--steps", "12",
         "--save-at", "4,8", "--kill-at", "8"], env=env, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "at_manifest").exists():
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            assert time.monotonic() < deadline, "worker never reached the manifest write"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    root = run / "checkpoints"
    tmp_dirs = [p for p in root.iterdir() if p.name.startswith(".tmp-step-000008-")]
    assert len(tmp_dirs) == 1 and (tmp_dirs[0] / "shard-00000-of-00001.h5").exists()
    assert not (tmp_dirs[0] / "manifest.json").exists()
    assert not (root / "step-000008").exists()
    assert ckpt.find_latest_valid(run) == root / "step-000004"
    assert ckpt.read_latest_pointer(run) == root / "step-000004"
    infos = ckpt.list_checkpoints(run, include_incomplete=True)
    assert [(i.step, i.complete, i.valid) for i in infos] == [(4, True, True), (8, False, False)]
    # Resuming works, and the next completed save removes the leftover.
    worker.run(["--run-dir", str(run), "--out", str(tmp_path / "out2"), "--steps", "8",
                "--resume", "auto", "--save-at", "8"])
    assert record(tmp_path / "out2")["loaded"]["step"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000008"]


# ---- the tool -------------------------------------------------------------------------------------
def test_tool_ls_show_verify(mlbfgs_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tool_main(["ls", str(mlbfgs_ckpt)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "WORLD", "SIZE", "STATUS"]
    assert lines[1].split()[:3] == ["step-000004", "4", "1"] and "valid" in lines[1]
    assert lines[2].endswith("valid (latest)")

    assert tool_main(["show", str(mlbfgs_ckpt)]) == 0
    out = capsys.readouterr().out
    assert "step         8" in out and "torch.optim.lr_scheduler.StepLR" in out
    table = [line.split() for line in out.splitlines() if line.startswith(("0 ", "1 ", "2 "))]
    # 8 steps, update_freq 2: pairs at steps 4, 6, 8 -> 3 accepted, ring of 3 full.
    assert [(row[5], row[9], row[10]) for row in table] == [("3/3", "3", "0")] * 3
    assert tool_main(["show", "--json", str(mlbfgs_ckpt)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["blocks"][0]["rho_min"] <= shown["blocks"][0]["rho_max"]

    assert tool_main(["verify", str(mlbfgs_ckpt)]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("OK: all 2 checkpoints ")
    assert tool_main(["verify", str(mlbfgs_ckpt / "checkpoints" / "step-000008")]) == 0
    assert capsys.readouterr().out.startswith("OK ")
    assert tool_main(["verify", str(mlbfgs_ckpt / "nothing")]) == 1


def test_tool_diff_and_export(mlbfgs_ckpt: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    root = mlbfgs_ckpt / "checkpoints"
    a, b = root / "step-000004", root / "step-000008"
    assert tool_main(["diff", str(b), str(mlbfgs_ckpt)]) == 0
    assert "identical" in capsys.readouterr().out
    assert tool_main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "model/0.weight:" in out and "optimizer/blocks/000000/S:" in out
    assert "optimizer/global/step: 4 vs 8" not in out  # 0-d tensors are compared as tensors
    assert "optimizer/global/step: 1 of 1 elements differ" in out
    assert tool_main(["diff", "--atol", "1e6", str(a), str(b)]) == 1  # integers stay exact

    target = tmp_path / "weights.pt"
    assert tool_main(["export", str(mlbfgs_ckpt), str(target)]) == 0
    exported = torch.load(target, weights_only=True)
    model = make_bn_model()
    load(b, model, make_optimizer("mlbfgs", model))
    assert_state_equal(exported, model.state_dict(), "export")
    assert tool_main(["show", str(tmp_path / "missing")]) == 2
