"""The device a run trains on: ``--device`` resolution (everywhere) and the CUDA path (on a
machine with a GPU; those tests are skipped without one, as in CI).

What the CUDA tests pin down:

* the optimizer is device-agnostic: mL-BFGS on a GPU follows the CPU run step for step
  (float64, so the only difference is the order of floating-point sums inside the kernels);
* the training command trains on the GPU, and a GPU run checkpointed, stopped and resumed ends
  bitwise equal to the uninterrupted GPU run (MLP: cuBLAS GEMMs are deterministic on one GPU
  with a fixed workspace configuration);
* a checkpoint is device-neutral: written from the GPU, it resumes on the CPU (and the
  weights it loads are those the GPU run saved).
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
import torch

from mlbfgs_hpc import MLBFGS
from mlbfgs_hpc.blocks import build_blocks
from mlbfgs_hpc.checkpoint import find_latest_valid, list_checkpoints, model_state_dict
from mlbfgs_hpc.data import load_dataset
from mlbfgs_hpc.device import resolve_device
from mlbfgs_hpc.train import main
from tests.train_runs import BASE_ARGS, assert_same_final_state, checkpoint_steps, run_training

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
TRAIN_TIMEOUT_S = 300.0


# ---- --device resolution (runs everywhere) --------------------------------------------------
def test_cpu_is_always_cpu() -> None:
    assert resolve_device("cpu", local_rank=3) == torch.device("cpu")


def test_auto_is_cpu_without_cuda_and_this_ranks_gpu_with_it() -> None:
    got = resolve_device("auto", local_rank=1)
    if torch.cuda.is_available():
        assert got == torch.device("cuda", 1 % torch.cuda.device_count())
    else:
        assert got == torch.device("cpu")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cuda:-1", "", "CPU"])
def test_bad_device_spec_raises(spec: str) -> None:
    with pytest.raises(ValueError, match="--device"):
        resolve_device(spec)


def test_negative_local_rank_raises() -> None:
    with pytest.raises(ValueError, match="local_rank"):
        resolve_device("cpu", local_rank=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_without_cuda_raises_clearly(spec: str) -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device(spec)


def test_train_command_reports_a_bad_device_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        code = main(["--dataset", "synthetic", "--model", "mlp", "--steps", "2", "--quiet",
                     "--device", "tpu", "--run-dir", str(tmp_path)])
    finally:  # main() leaves SIGUSR1 ignored, as a process exit path should
        signal.signal(signal.SIGUSR1, previous)
    assert code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mlbfgs-train: error: --device must be")
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing started


def test_dataset_split_to_same_device_is_itself() -> None:
    split = load_dataset("synthetic", split="test", synthetic_size=64)
    assert split.to("cpu") is split


# ---- the CUDA path -------------------------------------------------------------------------
def _mlbfgs_run(device: str, steps: int = 60) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 5)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(steps, 64, 20, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 5, (steps, 64), generator=gen)
    model = model.to(device)
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.2, history_size=5,
                 update_freq=3, momentum=0.9, weight_decay=1e-4)
    for i in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i].to(device)), y[i].to(device)).backward()
        opt.step()
    params = {n: p.detach().cpu() for n, p in model.named_parameters()}
    return params, dict(opt.counters)


@needs_cuda
def test_mlbfgs_on_cuda_follows_the_cpu_run() -> None:
    cpu_params, cpu_counters = _mlbfgs_run("cpu")
    gpu_params, gpu_counters = _mlbfgs_run("cuda")
    assert cpu_counters["accepted_pairs"] > 0  # the recursion really ran
    # Same branches, same pairs accepted, same guard decisions.
    for key in ("accepted_pairs", "rejected_pairs", "sgd_fallbacks", "skipped_steps", "step"):
        assert gpu_counters[key] == cpu_counters[key], key
    # float64 with different summation orders in the kernels: ~1e-15 relative per operation,
    # grown over 60 steps of a well-conditioned problem; 1e-9 leaves a wide margin and still
    # catches any algorithmic difference (those are O(lr·|g|) ~ 1e-2).
    for name, ref in cpu_params.items():
        torch.testing.assert_close(gpu_params[name], ref, rtol=1e-9, atol=1e-9, msg=name)


@needs_cuda
def test_train_on_cuda_resumes_bitwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # cuBLAS picks deterministic GEMM algorithms with a fixed workspace configuration.
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    args = [*BASE_ARGS, "--device", "cuda", "--steps", "40", "--resume", "never"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    code, out = run_training([*args, "--run-dir", str(whole)], log=tmp_path / "whole.log",
                             timeout=TRAIN_TIMEOUT_S)
    assert code == 0, out
    assert "trains on cuda:0" in out, out
    code, out = run_training([*args, "--run-dir", str(part), "--checkpoint-every", "20"],
                             log=tmp_path / "part.log", timeout=TRAIN_TIMEOUT_S)
    assert code == 0, out
    assert checkpoint_steps(part) == [20, 40]
    # Keep only the step-20 checkpoint and resume from it on the GPU.
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    step20 = next(c for c in list_checkpoints(part) if c.step == 20)
    shutil.copytree(step20.path, resumed / "checkpoints" / step20.path.name)
    code, out = run_training([*BASE_ARGS, "--device", "cuda", "--steps", "40",
                              "--run-dir", str(resumed)], log=tmp_path / "resumed.log",
                             timeout=TRAIN_TIMEOUT_S)
    assert code == 0, out
    assert "resumed from" in out and "at step 20" in out, out
    assert assert_same_final_state(whole, resumed) > 0


@needs_cuda
def test_gpu_checkpoint_resumes_on_cpu(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu"
    code, out = run_training([*BASE_ARGS, "--device", "cuda", "--steps", "20",
                              "--run-dir", str(gpu), "--resume", "never"],
                             log=tmp_path / "gpu.log", timeout=TRAIN_TIMEOUT_S)
    assert code == 0, out
    newest = find_latest_valid(gpu)
    assert newest is not None
    saved = model_state_dict(newest)
    cpu = tmp_path / "cpu"
    shutil.copytree(gpu, cpu)
    code, out = run_training([*BASE_ARGS, "--device", "cpu", "--steps", "30",
                              "--run-dir", str(cpu)], log=tmp_path / "cpu.log",
                             timeout=TRAIN_TIMEOUT_S)
    assert code == 0, out
    assert "trains on cpu" in out and "at step 20" in out, out
    assert checkpoint_steps(cpu)[-1] == 30
    assert all(t.device.type == "cpu" for t in saved.values())
    assert any(t.abs().sum() > 0 for t in saved.values())
