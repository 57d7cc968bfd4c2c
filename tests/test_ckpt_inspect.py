"""``mlbfgs-ckpt diff`` and ``verify`` on checkpoints written in-process.

diff: training state compared, run metadata (wall-clock, configuration) shown apart and never
counted; tolerances agree with ``numpy.allclose`` element for element (numpy is the oracle);
NaN matches NaN. verify: every checkpoint of a run directory is checked and reported, a damaged
one makes the exit code 1 whichever it is, and a single shard file can be verified alone.
(Real training runs compared with ``diff``: ``tests/test_run_dir.py``.)
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlbfgs_hpc import LocalCommunicator
from mlbfgs_hpc import checkpoint as ckpt
from tests.ckpt_helpers import TOOL, Stateful, flip_byte_in_dataset, tool_main


def save_model(run: Path, model: torch.nn.Module, *, extra: dict[str, Any] | None = None,
               config: dict[str, Any] | None = None, scheduler: Any = None,
               step: int = 1) -> Path:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return ckpt.save_checkpoint(run, step=step, model=model, optimizer=optimizer,
                                comm=LocalCommunicator(), scheduler=scheduler, extra=extra,
                                config=config)


def linear_with(weight: torch.Tensor) -> torch.nn.Module:
    model = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(weight)
    return model


# ---- diff ------------------------------------------------------------------------------------
def test_run_metadata_is_shown_apart_and_never_counted(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    weight = torch.randn(3, 4)
    # b: the same state, written by a signal that arrived at the last step (final False).
    a = save_model(tmp_path / "a", linear_with(weight), config={"run_dir": "runs/a"},
                   extra={"epoch": 1, "elapsed_seconds": 0.063, "final": True})
    b = save_model(tmp_path / "b", linear_with(weight), config={"run_dir": "runs/b"},
                   extra={"epoch": 1, "elapsed_seconds": 0.049, "final": False})
    result = ckpt.compare_checkpoints(a, b)
    assert result.identical and result.compared > 0
    assert "extra/elapsed_seconds: 0.063 vs 0.049" in result.metadata
    assert "extra/final: True vs False" in result.metadata
    assert "config/run_dir: 'runs/a' vs 'runs/b'" in result.metadata
    assert ckpt.diff_checkpoints(a, b) == ([], result.compared)
    assert tool_main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "run metadata (shown apart: never makes the exit code non-zero):" in out
    assert "  extra/elapsed_seconds: 0.063 vs 0.049" in out
    assert out[-1].startswith("identical (bitwise): ")
    # The data-order position is training state: it counts.
    c = save_model(tmp_path / "c", linear_with(weight), extra={"epoch": 2})
    assert tool_main(["diff", str(a), str(c)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert "extra/epoch: 1 vs 2" in out
    assert out[-1].startswith("DIFFERENT (bitwise): 1 of ")


def test_tolerances_agree_with_numpy_allclose(tmp_path: Path) -> None:
    """Values in the hundreds (like rho = 1/sᵀy) and near zero, perturbed by float32-sized
    amounts: every verdict is numpy.allclose's with the documented tolerances (atol alone:
    numpy's rtol 1e-5; rtol alone: atol = rtol × the tensor's largest |b|)."""
    gen = torch.Generator().manual_seed(7)
    big = 100 + 400 * torch.rand(4, 8, generator=gen)
    small = 1e-6 * torch.randn(4, 8, generator=gen)
    weight = torch.cat([big, small], dim=1)
    noise = torch.randn(weight.shape, generator=gen)
    other = weight + noise * torch.where(weight.abs() > 1, 1.5e-5, 4e-9)
    a = save_model(tmp_path / "a", linear_with(weight))
    b = save_model(tmp_path / "b", linear_with(other))
    wa, wb = weight.double().numpy(), other.double().numpy()
    for atol, rtol in [(None, None), (1e-5, None), (None, 1e-4), (None, 1e-9), (1e-5, 0.0),
                       (0.0, 1e-4), (1e-8, 1e-7), (1e-3, 0.0), (1e-2, 1e-9)]:
        result = ckpt.compare_checkpoints(a, b, atol=atol, rtol=rtol)
        if atol is None and rtol is None:
            assert not result.identical
            continue
        numpy_rtol = 1e-5 if rtol is None else rtol
        numpy_atol = atol if atol is not None else numpy_rtol * float(np.abs(wb).max())
        expected = bool(np.allclose(wa, wb, rtol=numpy_rtol, atol=numpy_atol))
        assert result.identical == expected, (atol, rtol, result.differences)
        stats = result.groups["model"]
        assert stats.max_abs == pytest.approx(float(np.abs(wa - wb).max()))
        assert stats.differing == (0 if expected else 1)
    # The case: rho in the hundreds, off by 1.5e-5 -> fails --atol 1e-5 --rtol 0,
    # passes --rtol 1e-4.
    assert not ckpt.compare_checkpoints(a, b, atol=1e-5, rtol=0.0).identical
    assert ckpt.compare_checkpoints(a, b, rtol=1e-4).identical
    assert tool_main(["diff", "--rtol", "1e-4", str(a), str(b)]) == 0
    assert tool_main(["diff", "--atol", "1e-5", "--rtol", "0", str(a), str(b)]) == 1
    with pytest.raises(ValueError, match="rtol must be a finite number >= 0"):
        ckpt.compare_checkpoints(a, b, rtol=-1.0)


def test_rtol_alone_judges_near_zero_elements_on_the_tensors_scale(tmp_path: Path) -> None:
    """What 1 process vs 2 ranks looks like: parameters of size ~0.3 whose float32 sums ran
    in another order, so a parameter *difference* s = x1 - x0 that is near zero is off by an
    ulp of 0.3 (~3e-8), a large relative error. numpy's fixed atol 1e-8 fails it; --rtol
    alone judges it on the tensor's scale and passes; a real 1e-3 change still fails."""
    gen = torch.Generator().manual_seed(3)
    x0 = 0.3 + 0.01 * torch.randn(64, generator=gen)
    x1 = x0 + 1e-6 * torch.randn(64, generator=gen)  # tiny steps: s ~ 1e-6
    s = x1 - x0
    s_other = (x1 + 3e-8) - x0  # the same, one float32 rounding apart
    a = save_model(tmp_path / "a", linear_with(s.reshape(8, 8)))
    b = save_model(tmp_path / "b", linear_with(s_other.reshape(8, 8)))
    assert ckpt.compare_checkpoints(a, b, rtol=1e-4, atol=1e-8).identical is False
    assert ckpt.compare_checkpoints(a, b, rtol=1e-1).identical  # scale ~1e-6 -> floor 1e-7
    big = save_model(tmp_path / "big", linear_with(torch.cat([x0[:56], s[:8]]).reshape(8, 8)))
    big_other = save_model(tmp_path / "big_other",
                           linear_with(torch.cat([x0[:56], s_other[:8]]).reshape(8, 8)))
    assert ckpt.compare_checkpoints(big, big_other, rtol=1e-4).identical  # scale 0.3
    changed = save_model(tmp_path / "changed",
                         linear_with(torch.cat([x0[:56] + 1e-3, s[:8]]).reshape(8, 8)))
    assert not ckpt.compare_checkpoints(big, changed, rtol=1e-4).identical


def test_nan_matches_nan_inf_matches_only_inf(tmp_path: Path) -> None:
    """Optimizer diagnostics are NaN when undefined: NaN (any payload, any sign) == NaN,
    bitwise and with tolerances, in tensors and in plain floats; inf == inf only."""
    nan = torch.tensor([float("nan"), 1.0, float("inf")])
    other_nan = nan.clone()
    other_nan.view(torch.int32)[0] ^= 0x7FFFF  # another NaN payload...
    other_nan[0] = -other_nan[0]  # ...and sign
    assert torch.isnan(other_nan[0]) and not torch.equal(nan.view(torch.int32)[:1],
                                                         other_nan.view(torch.int32)[:1])
    a = save_model(tmp_path / "a", linear_with(torch.ones(2, 2)),
                   scheduler=Stateful({"diag": nan, "cos_min": float("nan")}))
    b = save_model(tmp_path / "b", linear_with(torch.ones(2, 2)),
                   scheduler=Stateful({"diag": other_nan, "cos_min": float("nan")}))
    assert ckpt.compare_checkpoints(a, b).identical
    assert ckpt.compare_checkpoints(a, b, atol=1e-3).identical
    c = save_model(tmp_path / "c", linear_with(torch.ones(2, 2)),
                   scheduler=Stateful({"diag": torch.tensor([math.nan, 1.0, 1e30]),
                                       "cos_min": 0.5}))
    result = ckpt.compare_checkpoints(a, c, rtol=1.0)
    assert sorted(d.key for d in result.differences) == ["scheduler/cos_min",
                                                         "scheduler/diag"]


# ---- verify --------------------------------------------------------------------------------
def two_checkpoint_run(run: Path) -> tuple[Path, Path]:
    old = save_model(run, linear_with(torch.randn(8, 8)), step=4)
    new = save_model(run, linear_with(torch.randn(8, 8)), step=8)
    return old, new


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command line (``python tools/mlbfgs_ckpt.py``), as a job script runs it."""
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True,
                          timeout=120)


def test_verify_run_dir_checks_every_checkpoint(tmp_path: Path) -> None:
    """A truncated newest shard: exit 1 naming it, and the older checkpoint a resume would
    use; a damaged *older* checkpoint fails the run as well; an interrupted write does not."""
    run = tmp_path / "run"
    old, new = two_checkpoint_run(run)
    proc = run_tool("verify", str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "step-000004  step 4  OK" in proc.stdout and "step-000008  step 8  OK" in proc.stdout
    assert f"a resume would use {new}" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith(f"OK: all 2 checkpoints of {run}")

    (run / "checkpoints" / ".tmp-step-000012-0123456789ab").mkdir()  # a killed write
    shard = new / "shard-00000-of-00001.h5"
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    proc = run_tool("verify", str(run))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "step-000008  step 8  DAMAGED" in lines
    assert any(str(shard) in line and "truncated" in line for line in lines), lines
    assert any(line.startswith(".tmp-step-000012-0123456789ab  step 12  incomplete")
               for line in lines), lines
    assert f"a resume would use {old}" in lines
    assert lines[-1] == "INVALID: 1 of 2 checkpoints damaged (step-000008)"
    assert ckpt.find_latest_valid(run) == old  # what resume really does

    shutil.rmtree(new)
    flip_byte_in_dataset(old / "common.h5", "model/weight")
    proc = run_tool("verify", str(run))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "step-000004  step 4  DAMAGED" in proc.stdout
    assert proc.stdout.splitlines()[-1] == ("INVALID: 1 of 1 checkpoints damaged (step-000004)"
                                            "; none left to resume from")
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_tool("verify", str(empty))
    assert proc.returncode == 1 and f"INVALID: no checkpoints under {empty}" in proc.stdout


def test_verify_one_shard_file(tmp_path: Path) -> None:
    _, new = two_checkpoint_run(tmp_path / "run")
    shard = new / "shard-00000-of-00001.h5"
    proc = run_tool("verify", str(shard))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "size, sha256 and content match the manifest" in proc.stdout
    assert ckpt.verify_file(new / "common.h5") == []
    # Copied away from its manifest: checked for what it holds alone, and the output says so.
    alone = tmp_path / "alone.h5"
    shutil.copy(new / "common.h5", alone)
    proc = run_tool("verify", str(alone))
    assert proc.returncode == 0 and "no manifest beside it" in proc.stdout, proc.stdout
    flip_byte_in_dataset(alone, "model/weight")
    proc = run_tool("verify", str(alone))
    assert proc.returncode == 1 and "fletcher32" in proc.stdout, proc.stdout
    with shard.open("r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    problems = ckpt.verify_file(shard)
    assert any("truncated" in p for p in problems), problems
    assert run_tool("verify", str(shard)).returncode == 1
    not_ours = tmp_path / "x.h5"
    not_ours.write_bytes(b"not hdf5")
    assert any("cannot be opened as HDF5" in p for p in ckpt.verify_file(not_ours))

