"""Which device a rank trains on (``mlbfgs-train --device``)."""

from __future__ import annotations

import torch

from .cli import UsageError


def resolve_device(spec: str, *, local_rank: int = 0) -> torch.device:
    """The device a rank trains on, from ``--device``.

    ``auto`` is the GPU when CUDA is available, else the CPU. A bare ``cuda`` (and ``auto``)
    gives each rank on a host its own GPU, ``local_rank`` modulo the GPUs the host has (the
    usual one-rank-per-GPU launch); ranks beyond the GPU count share GPUs round-robin.

    Args:
        spec: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        local_rank: this rank's index among the ranks on its host (>= 0).

    Raises:
        UsageError: an unknown spec, or CUDA asked for where there is none (or no GPU N).
        ValueError: a negative ``local_rank``.
    """
    if local_rank < 0:
        raise ValueError(f"local_rank must be >= 0, got {local_rank}")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "cuda"
    if spec != "cuda" and not spec.startswith("cuda:"):
        raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: CUDA is not available to this torch "
                         f"({torch.__version__}); use --device cpu or auto")
    count = torch.cuda.device_count()
    if spec == "cuda":
        return torch.device("cuda", local_rank % count)
    index = spec.removeprefix("cuda:")
    if not index.isdigit() or int(index) >= count:
        raise UsageError(f"--device {spec}: this host has GPUs 0..{count - 1}")
    return torch.device("cuda", int(index))
