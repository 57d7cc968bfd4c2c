"""Which Horovod ``tools/bootstrap.sh`` builds on this machine: CPU (MPI) or GPU (NCCL).

Run with the virtual environment's Python (after torch is installed); prints shell
assignments that ``bootstrap.sh`` evaluates::

    flavor=nccl                       # or cpu
    reason='CUDA (torch.cuda), NCCL 2.x from nvidia-nccl-cu12, nvcc /usr/local/cuda/bin/nvcc'
    nccl_home=/…/site-packages/nvidia/nccl
    nccl_include=/…/site-packages/nvidia/nccl/include
    nccl_lib=/…/site-packages/nvidia/nccl/lib
    cuda_home=/usr/local/cuda

The GPU build needs all of: a GPU (the venv's ``torch.cuda.is_available()``, or
``nvidia-smi`` on the PATH), NCCL (the ``nvidia-nccl-cu*`` wheel a CUDA torch wheel depends
on: its ``include/nccl.h`` and ``lib/libnccl.so*``) and a CUDA toolkit to compile Horovod's
CUDA parts (``nvcc`` under ``$CUDA_HOME``, ``/usr/local/cuda`` or on the PATH). Anything
missing gives the CPU build, the default, with the reason printed. ``MLBFGS_HOROVOD=cpu``
or ``=nccl`` overrides the detection (``nccl`` still needs NCCL and nvcc to be found).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HorovodPlan:
    """The build to make: ``flavor`` ``"cpu"`` or ``"nccl"``, why, and the NCCL/CUDA paths
    (empty strings for the CPU build)."""

    flavor: str
    reason: str
    nccl_home: str = ""
    nccl_include: str = ""
    nccl_lib: str = ""
    cuda_home: str = ""

    def shell(self) -> str:
        return "\n".join(f"{key}={shlex.quote(value)}" for key, value in vars(self).items())


def find_nccl(site_dirs: list[Path]) -> Path | None:
    """The ``nvidia/nccl`` directory of an installed ``nvidia-nccl-cu*`` wheel, if any."""
    for site in site_dirs:
        home = site / "nvidia" / "nccl"
        if (home / "include" / "nccl.h").is_file() and any((home / "lib").glob("libnccl.so*")):
            return home
    return None


def find_nvcc(env: dict[str, str]) -> Path | None:
    """``nvcc`` under ``$CUDA_HOME``/``$CUDA_PATH``, ``/usr/local/cuda``, or on the PATH."""
    for root in (env.get("CUDA_HOME"), env.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return Path(root) / "bin" / "nvcc"
    found = shutil.which("nvcc", path=env.get("PATH"))
    return Path(found) if found else None


def decide(*, gpu: str | None, nccl_home: Path | None, nvcc: Path | None,
           override: str = "auto") -> HorovodPlan:
    """The build for a machine with a GPU seen by ``gpu`` (how it was seen, or ``None``),
    NCCL at ``nccl_home`` and ``nvcc`` (either ``None`` when absent).

    Raises:
        ValueError: ``override`` is not auto/cpu/nccl, or is ``nccl`` without NCCL or nvcc.
    """
    if override not in ("auto", "cpu", "nccl"):
        raise ValueError(f"MLBFGS_HOROVOD must be auto, cpu or nccl, got {override!r}")
    if override == "cpu":
        return HorovodPlan("cpu", "MLBFGS_HOROVOD=cpu")
    missing = [what for what, found in (("GPU", gpu if override == "auto" else "forced"),
                                        ("NCCL (nvidia-nccl-cu* wheel)", nccl_home),
                                        ("CUDA toolkit (nvcc)", nvcc)) if not found]
    if missing:
        if override == "nccl":
            raise ValueError(f"MLBFGS_HOROVOD=nccl but not found: {', '.join(missing)}")
        return HorovodPlan("cpu", "not found: " + ", ".join(missing))
    assert nccl_home is not None and nvcc is not None
    return HorovodPlan("nccl", f"GPU ({gpu}), NCCL {nccl_home}, nvcc {nvcc}",
                       nccl_home=str(nccl_home), nccl_include=str(nccl_home / "include"),
                       nccl_lib=str(nccl_home / "lib"), cuda_home=str(nvcc.parent.parent))


def detect_gpu(env: dict[str, str]) -> str | None:
    """How a GPU was seen: ``"torch.cuda"``, ``"nvidia-smi"``, or ``None``."""
    try:
        import torch
        if torch.cuda.is_available():
            return "torch.cuda"
    except ImportError:
        pass
    return "nvidia-smi" if shutil.which("nvidia-smi", path=env.get("PATH")) else None


def main() -> int:
    env = dict(os.environ)
    site_dirs = [Path(p) for p in sys.path if p.endswith("site-packages")]
    try:
        plan = decide(gpu=detect_gpu(env), nccl_home=find_nccl(site_dirs),
                      nvcc=find_nvcc(env), override=env.get("MLBFGS_HOROVOD", "auto"))
    except ValueError as exc:
        print(f"horovod_flavor: {exc}", file=sys.stderr)
        return 2
    print(plan.shell())
    return 0


if __name__ == "__main__":
    sys.exit(main())
