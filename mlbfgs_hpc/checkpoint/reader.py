"""Read-only access to one checkpoint: :class:`CheckpointReader` (used by the loader, the
diff and the ``mlbfgs-ckpt`` tool)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .errors import CheckpointCorruptError
from .h5io import open_h5, quote_key, read_tensor
from .layout import BLOCK_STATE_KEYS, COMMON_NAME, MANIFEST_NAME, shard_name
from .manifest import check_file, read_manifest, resolve_checkpoint
from .rng import RngState, read_rng
from .tree import LazyTensor, flatten, read_tree


class CheckpointReader:
    """Read-only access to one checkpoint (used by the loader and the ``mlbfgs-ckpt`` tool).

    Args:
        path: a checkpoint directory, or a run directory (its newest valid checkpoint).
        verify_digests: check each file's sha256 against the manifest before first use.

    Raises:
        CheckpointError: the path, manifest or schema is not usable.
    """

    def __init__(self, *, path: str | Path, verify_digests: bool = True) -> None:
        self.path = resolve_checkpoint(path)
        self.manifest = read_manifest(self.path)
        self.verify_digests = verify_digests
        self._files: dict[str, h5py.File] = {}

    @classmethod
    def from_manifest(cls, *, path: Path, manifest: dict[str, Any],
                      verify_digests: bool = True) -> CheckpointReader:
        """A reader for an already resolved checkpoint (no re-reading of the manifest)."""
        reader = cls.__new__(cls)
        reader.path, reader.manifest = path, manifest
        reader.verify_digests, reader._files = verify_digests, {}
        return reader

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    # ---- metadata ---------------------------------------------------------------------
    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def world_size(self) -> int:
        return int(self.manifest["world_size"])

    @property
    def optimizer_kind(self) -> str:
        return str(self.manifest["optimizer"]["kind"])

    def file(self, name: str) -> h5py.File:
        """An open HDF5 file of the checkpoint, checked against its manifest entry."""
        if name not in self._files:
            info = self.manifest["files"].get(name)
            if info is None:
                raise CheckpointCorruptError(f"{self.path / name} is not listed in "
                                             f"{self.path / MANIFEST_NAME}")
            problem = check_file(self.path, name, info, digest=self.verify_digests)
            if problem is not None:
                raise CheckpointCorruptError(problem)
            try:
                self._files[name] = open_h5(self.path / name)
            except (OSError, ValueError) as exc:
                raise CheckpointCorruptError(
                    f"{self.path / name} cannot be opened as HDF5: {exc}") from exc
        return self._files[name]

    def shard_of_block(self, block: int) -> str:
        return str(self.manifest["blocks"][block]["shard"])

    # ---- content ------------------------------------------------------------------------
    def model_state(self) -> dict[str, torch.Tensor]:
        """The model's ``state_dict`` (parameters and buffers) as saved by rank 0."""
        group = self.file(COMMON_NAME)["model"]
        state: dict[str, torch.Tensor] = {}
        for entry in self.manifest["model"]:
            key = quote_key(entry["name"])
            if key not in group:
                raise CheckpointCorruptError(f"{self.path / COMMON_NAME}: model entry "
                                             f"{entry['name']} is missing")
            state[entry["name"]] = read_tensor(group[key])
        return state

    def optimizer_state(self, *, lazy: bool = False) -> Any:
        """The optimizer's state dict; for mL-BFGS without the per-block ``state``."""
        return read_tree(self.file(COMMON_NAME)["optimizer"], lazy=lazy)

    def scheduler_state(self, *, lazy: bool = False) -> Any:
        """The LR scheduler's state dict, or ``None`` when none was saved."""
        group = self.file(COMMON_NAME).get("scheduler")
        return None if group is None else read_tree(group, lazy=lazy)

    def block_state(self, block: int, *, lazy: bool = False) -> dict[str, Any]:
        """One mL-BFGS block's tensors, from whichever shard holds it."""
        if not 0 <= block < len(self.manifest["blocks"]):
            raise ValueError(f"block must be in [0, {len(self.manifest['blocks'])}), "
                             f"got {block}")
        name = self.shard_of_block(block)
        group = self.file(name).get(f"blocks/{block:06d}")
        if group is None:
            raise CheckpointCorruptError(f"{self.path / name}: block {block} is missing")
        missing = [key for key in BLOCK_STATE_KEYS if key not in group]
        if missing:
            raise CheckpointCorruptError(f"{self.path / name}: block {block} lacks {missing}")
        return {key: (LazyTensor(group[key]) if lazy else read_tensor(group[key]))
                for key in group}

    def rng_state(self, rank: int) -> RngState:
        """The RNG states rank ``rank`` saved."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        name = shard_name(rank, self.world_size)
        group = self.file(name).get("rng")
        if group is None:
            raise CheckpointCorruptError(f"{self.path / name}: group /rng is missing")
        return read_rng(group)

    def entries(self, *, include_rng: bool = False) -> dict[str, Any]:
        """Every saved value under a stable key, tensors as lazy loaders.

        Keys do not depend on the world size (blocks are keyed by block index), so two
        checkpoints written on different numbers of ranks compare entry by entry.
        """
        out: dict[str, Any] = {}
        group = self.file(COMMON_NAME)["model"]
        for entry in self.manifest["model"]:
            out[f"model/{entry['name']}"] = LazyTensor(group[quote_key(entry["name"])])
        flatten(self.optimizer_state(lazy=True), "optimizer", out)
        for block in range(len(self.manifest["blocks"])):
            for key, value in self.block_state(block, lazy=True).items():
                out[f"optimizer/blocks/{block:06d}/{key}"] = value
        flatten(self.scheduler_state(lazy=True), "scheduler", out)
        flatten(self.manifest.get("extra", {}), "extra", out)
        if include_rng:
            for rank in range(self.world_size):
                state = self.rng_state(rank)
                out[f"rng/{rank}/torch"] = state.torch_state
                out[f"rng/{rank}/numpy"] = torch.from_numpy(state.numpy_state[1].astype(
                    np.int64))
                out[f"rng/{rank}/numpy_pos"] = int(state.numpy_state[2])
                out[f"rng/{rank}/python"] = torch.tensor(state.python_state[1])
        return out
