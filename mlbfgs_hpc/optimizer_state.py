"""The optimizer's state-dict format: which tensors it holds, and the checks a load makes.

``MLBFGS.state_dict()`` is fixed-shape tensors per owned block (the flat buffers' slices,
the curvature ring and how many steps each of the block's parameters took part in) plus
run-wide counters, so a state saved on p ranks loads on any other number: each rank takes
the blocks it owns, after :func:`check_saved_state` has confirmed that the saved block table
is this model's (names compared canonically, :mod:`mlbfgs_hpc.naming`: a state saved from a
``torch.compile``d model loads into the plain one). Settings that differ from the saved
ones keep the new value, and :func:`log_changed_settings` says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .blocks import ParamBlock
from .naming import canonical_name

logger = logging.getLogger("mlbfgs_hpc.optimizer")

#: Flat per-rank buffers whose per-block slices are part of the checkpointed block state.
FLAT_STATE_KEYS: tuple[str, ...] = (
    "m_param", "m_grad", "snap_param", "snap_grad", "momentum_buffer")
#: Step counters and guard values, identical on every rank.
GLOBAL_STATE_KEYS: tuple[str, ...] = (
    "step", "skipped_steps", "sgd_fallbacks", "accepted_pairs", "rejected_pairs",
    "last_nu", "last_gamma")
#: Per block: the steps each of its parameters took part in (int64, one per parameter; a
#: state saved before it existed loads as "every step").
GRAD_STEPS_KEY = "grad_steps"
STATE_FORMAT_VERSION = 1


def new_global_state() -> dict[str, torch.Tensor]:
    """The run-wide counters (:data:`GLOBAL_STATE_KEYS`) of a fresh optimizer."""
    return {
        "step": torch.zeros((), dtype=torch.int64),
        "skipped_steps": torch.zeros((), dtype=torch.int64),
        "sgd_fallbacks": torch.zeros((), dtype=torch.int64),
        "accepted_pairs": torch.zeros((), dtype=torch.int64),
        "rejected_pairs": torch.zeros((), dtype=torch.int64),
        "last_nu": torch.ones((), dtype=torch.float64),
        "last_gamma": torch.full((), math.nan, dtype=torch.float64),
    }


def param_group_table(param_groups: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The param groups as torch saves them: hyper-parameters, params as indices."""
    param_index = {id(p): i for i, p in enumerate(p for g in param_groups for p in g["params"])}
    return [{**{k: v for k, v in g.items() if k != "params"},
             "params": [param_index[id(p)] for p in g["params"]]} for g in param_groups]


def check_saved_state(state_dict: dict[str, Any], *, blocks: Sequence[ParamBlock],
                      owned_blocks: Sequence[int], n_groups: int, searched: bool = False
                      ) -> None:
    """Raise ``ValueError`` unless ``state_dict`` can be loaded by a rank owning
    ``owned_blocks`` of ``blocks`` with ``n_groups`` param groups (format version, block
    table, owned blocks present, number of groups, and the same mode: with a line search
    (``searched``) or without; the two keep different histories)."""
    if state_dict.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(f"unsupported optimizer state format_version "
                         f"{state_dict.get('format_version')!r}, "
                         f"expected {STATE_FORMAT_VERSION}")
    saved = [(canonical_name(b["name"]), tuple(map(canonical_name, b["param_names"])),
              int(b["numel"])) for b in state_dict["blocks"]]
    mine = [(canonical_name(b.name), tuple(map(canonical_name, b.param_names)), b.numel)
            for b in blocks]
    if saved != mine:
        diff = [f"block {i}: saved {s} vs model {m}" for i, (s, m) in
                enumerate(zip(saved, mine)) if s != m]
        raise ValueError("optimizer state was saved for other blocks: "
                         f"{len(saved)} saved vs {len(mine)} blocks; " + "; ".join(diff[:5]))
    missing = [b for b in owned_blocks if b not in state_dict["state"]]
    if missing:
        raise ValueError(f"optimizer state lacks owned blocks {missing}")
    if len(state_dict["param_groups"]) != n_groups:
        raise ValueError("optimizer state has a different number of param groups")
    if ("line_search" in state_dict) != searched:
        saved_mode, mode = (("with", "without") if "line_search" in state_dict
                            else ("without", "with"))
        raise ValueError(f"optimizer state was saved {saved_mode} line_search_fn, this "
                         f"optimizer runs {mode} it: the curvature histories differ (one "
                         f"over the whole vector, one per block); start the new mode fresh")


def pack_state(*, block_states: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
               global_state: Mapping[str, torch.Tensor],
               param_groups: Sequence[dict[str, Any]], config: dict[str, Any],
               blocks: Sequence[ParamBlock]) -> dict[str, Any]:
    """``MLBFGS.state_dict()``: copies of the given blocks' tensors and of the counters, the
    param groups (:func:`param_group_table`), the config and the block table."""
    return {
        "format_version": STATE_FORMAT_VERSION,
        "state": {b: {k: v.clone() for k, v in tensors.items()} for b, tensors in block_states},
        "global": {k: v.clone() for k, v in global_state.items()},
        "param_groups": param_group_table(param_groups),
        "config": config,
        "blocks": [{"name": b.name, "param_names": list(b.param_names), "numel": b.numel}
                   for b in blocks],
    }


def load_group_settings(param_groups: Sequence[dict[str, Any]],
                        saved_groups: Sequence[Mapping[str, Any]]) -> None:
    """Set every saved hyper-parameter (lr, momentum, a scheduler's keys, ...) on the live
    groups. A key the saved groups lack keeps the live value: states written while momentum
    was optimizer-wide load with this optimizer's momentum."""
    for group, saved_group in zip(param_groups, saved_groups):
        for key, value in saved_group.items():
            if key != "params":
                group[key] = value


def changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``key: saved -> current`` for each setting of the saved config that differs."""
    return [f"{key}: {saved[key]!r} -> {value!r}" for key, value in current.items()
            if key in saved and saved[key] != value]


def log_changed_settings(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Log, once, the settings a loaded state was saved with that this optimizer does not
    share: the state continues, the optimizer's own values apply."""
    changes = changed_settings(saved, current)
    if changes:
        logger.warning("the loaded optimizer state was saved with other settings; this "
                       "optimizer's values apply: %s", ", ".join(changes))
