"""What every MPI test worker leaves for its test: one JSON record per rank, and rank 0's
final parameters (the tests compare them with a one-process run's)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def write_worker_output(out: Path, *, rank: int, record: dict[str, Any],
                        model: torch.nn.Module) -> None:
    """``out/rank{rank}.json`` from ``record``; on rank 0 also ``out/params.pt``."""
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()},
                   out / "params.pt")
