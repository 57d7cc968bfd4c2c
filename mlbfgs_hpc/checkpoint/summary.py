"""What ``mlbfgs-ckpt show`` and ``export`` read: manifest facts, per-block history
statistics and the model weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .reader import CheckpointReader


def checkpoint_summary(path: str | Path) -> dict[str, Any]:
    """What ``mlbfgs-ckpt show`` prints: manifest facts plus per-block history statistics."""
    with CheckpointReader(path=path) as reader:
        manifest = reader.manifest
        blocks: list[dict[str, Any]] = []
        for block in manifest["blocks"]:
            state = reader.block_state(block["index"])
            m = int(state["rho"].numel())
            count, head = int(state["count"]), int(state["head"])
            filled = [(head - 1 - k) % m for k in range(count)]
            rho = state["rho"][filled] if filled else None
            blocks.append({
                **{k: block[k] for k in ("index", "name", "numel", "rank", "shard")},
                "params": block["param_names"], "count": count, "history_size": m,
                "rho_min": None if rho is None else float(rho.min()),
                "rho_max": None if rho is None else float(rho.max()),
                "gamma": float(state["gamma"]), "accepted": int(state["accepted"]),
                "rejected": int(state["rejected"])})
        optimizer = reader.optimizer_state()
        total = sum(info["bytes"] for info in manifest["files"].values())
        return {"path": str(reader.path), "manifest": manifest, "blocks": blocks,
                "optimizer_state": optimizer, "scheduler_state": reader.scheduler_state(),
                "bytes": total}


def model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers saved in a checkpoint (or a run's newest valid)."""
    with CheckpointReader(path=path) as reader:
        return reader.model_state()
