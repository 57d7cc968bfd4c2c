"""tools/bootstrap.sh, the set-up both README commands run: one at a time per environment."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_concurrent_bootstrap_waits_for_the_running_one() -> None:
    """A bootstrap started while another holds the environment's lock waits (and says so),
    then finishes normally once the lock is released: two `tools/train.sh` side by side
    must not both run `pip install` into one environment."""
    venv = Path(sys.prefix)
    env = {**os.environ, "MLBFGS_VENV": str(venv), "MLBFGS_SKIP_APT": "1"}
    with open(f"{venv}.bootstrap.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([str(REPO / "tools" / "bootstrap.sh")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3.0)
            assert proc.poll() is None, "bootstrap did not wait for the lock holder"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "waiting for another bootstrap" in err
    assert "ready" in err


# ---- the Horovod flavour (tools/horovod_flavor.py) -------------------------------------------
def _fake_nccl(root: Path) -> Path:
    """The layout of an installed nvidia-nccl-cu12 wheel: nvidia/nccl/{include,lib}."""
    home = root / "nvidia" / "nccl"
    (home / "include").mkdir(parents=True)
    (home / "lib").mkdir()
    (home / "include" / "nccl.h").write_text("/* nccl */\n")
    (home / "lib" / "libnccl.so.2").write_bytes(b"")
    return home


def test_flavor_decision(tmp_path: Path) -> None:
    from tools.horovod_flavor import decide, find_nccl, find_nvcc

    assert find_nccl([tmp_path / "empty-site"]) is None
    site = tmp_path / "site-packages"
    home = _fake_nccl(site)
    assert find_nccl([tmp_path / "empty-site", site]) == home
    cuda = tmp_path / "cuda"
    (cuda / "bin").mkdir(parents=True)
    (cuda / "bin" / "nvcc").write_text("")
    nvcc = find_nvcc({"CUDA_HOME": str(cuda), "PATH": ""})
    assert nvcc == cuda / "bin" / "nvcc"

    plan = decide(gpu="nvidia-smi", nccl_home=home, nvcc=nvcc)
    assert plan.flavor == "nccl"
    assert (plan.nccl_include, plan.nccl_lib, plan.cuda_home) == (
        str(home / "include"), str(home / "lib"), str(cuda))
    assert "HOROVOD" not in plan.shell() and "flavor=nccl" in plan.shell()
    # Anything missing: the CPU build, saying what was missing.
    assert decide(gpu=None, nccl_home=home, nvcc=nvcc).reason == "not found: GPU"
    assert decide(gpu="torch.cuda", nccl_home=None, nvcc=nvcc).flavor == "cpu"
    assert decide(gpu="torch.cuda", nccl_home=home, nvcc=None).flavor == "cpu"
    assert decide(gpu="torch.cuda", nccl_home=home, nvcc=nvcc, override="cpu").flavor == "cpu"
    assert decide(gpu=None, nccl_home=home, nvcc=nvcc, override="nccl").flavor == "nccl"
    with pytest.raises(ValueError, match="NCCL"):
        decide(gpu="torch.cuda", nccl_home=None, nvcc=nvcc, override="nccl")
    with pytest.raises(ValueError, match="auto, cpu or nccl"):
        decide(gpu=None, nccl_home=None, nvcc=None, override="gpu")


def test_this_cpu_machine_gets_the_cpu_horovod() -> None:
    """The decision as bootstrap.sh runs it, on this GPU-less machine: the CPU build, and the
    installed Horovod is that build (MPI, no NCCL)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the CPU decision is not what this machine should get")
    out = subprocess.run([sys.executable, str(REPO / "tools" / "horovod_flavor.py")],
                         env={**os.environ, "MLBFGS_HOROVOD": "auto"}, check=True,
                         capture_output=True, text=True).stdout
    assert out.splitlines()[0] == "flavor=cpu"
    assert "GPU" in out.splitlines()[1]
    check = ("import horovod.torch as hvd; "
             "print(int(hvd.mpi_built()), int(hvd.nccl_built()))")
    built = subprocess.run([sys.executable, "-c", check], check=True, capture_output=True,
                           text=True, timeout=120).stdout.split()
    assert built == ["1", "0"]
