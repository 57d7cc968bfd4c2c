"""Sharded HDF5 checkpoints: atomic, checksummed, pickle-free, resumable on any world size.

This is the only module that talks to HDF5 (``h5py``). One checkpoint is one directory::

    RUN/checkpoints/
      latest                         text file: the name of the newest complete checkpoint
      step-000100/
        manifest.json                written LAST by rank 0: a directory without it is incomplete
        common.h5                    rank 0: model, optimizer common state, LR scheduler
        shard-00000-of-00004.h5      rank 0: its RNG states and the mL-BFGS blocks it owns
        shard-00001-of-00004.h5      rank 1: ...
        ...
      step-000200/ ...
      .tmp-step-000300-1f2e3d4c5b6a  a write in progress (or killed): never read, removed later

HDF5 layout (``h5ls -r`` shows exactly these paths)::

    common.h5
      /                    attrs: format, schema_version, kind="common", step, world_size
      /model/<name>        one dataset per entry of model.state_dict() (parameters AND buffers;
                           rank 0's buffers, e.g. its BatchNorm running statistics)
      /optimizer           attrs: kind ("mlbfgs" | "torch"), class, tree (JSON, see below)
      /optimizer/<path>    tensors of the optimizer's state_dict():
                           mL-BFGS: global/<counter>, without the per-block state;
                           torch optimizers (SGD, Adam, LBFGS, ...): their whole state_dict,
                           e.g. state/0/exp_avg (replicated on all ranks, rank 0's is saved)
      /scheduler           attrs: class, tree (JSON); tensors (if any) below it
    shard-RRRRR-of-WWWWW.h5
      /                    attrs: format, schema_version, kind="shard", rank, world_size, step, host
      /blocks/<BBBBBB>     one group per mL-BFGS block owned by the rank that wrote the shard;
                           attrs: name, numel, param_names (JSON)
        m_param m_grad snap_param snap_grad momentum_buffer   (numel,)   flat buffers
        S Y                                                    (m, numel) history ring
        rho                                                    (m,)
        gamma head count accepted rejected                     0-d, stored as (1,) + attr scalar=1
      /rng/torch           uint8 torch.get_rng_state() of the rank that wrote the shard
      /rng/cuda/<i>        per CUDA device (only when CUDA was initialised)
      /rng/numpy_keys      uint32 (624,) legacy numpy MT19937 keys; attrs pos, has_gauss,
                           cached_gaussian
      /rng/python_state    int64 (625,) ``random.getstate()[1]``; attrs version, gauss_next (JSON)

Conventions:

* Every dataset is chunked (chunks of at most 4 MiB), uncompressed, with the **fletcher32**
  filter, so any read of a damaged chunk fails. Every tensor dataset carries the attr
  ``torch_dtype`` (``bfloat16`` is stored as its ``int16`` bit pattern). HDF5 cannot chunk a
  0-d dataset, so 0-d tensors are stored with shape ``(1,)`` and the attr ``scalar = 1``.
* Nested state (torch optimizers, LR schedulers, mL-BFGS ``param_groups``/``config``/block
  table) is stored as a JSON *skeleton* in the group attr ``tree`` in which every tensor is
  replaced by ``{"__tensor__": "<dataset path relative to the group>"}``; tuples are
  ``{"__tuple__": [...]}``, dicts with non-string keys (the int parameter ids of torch
  optimizers) ``{"__dict__": [[key, value], ...]}``, non-finite floats ``{"__float__": "nan"}``.
  Dataset paths are the dict keys / list indices, URL-quoted (``/`` becomes ``%2F``).
* ``manifest.json`` (JSON, for humans and tools like ``jq``) holds the schema version,
  package/torch/h5py versions, the run configuration and ``extra`` (data-order position) given
  by the caller, the model table (name, shape, dtype, parameter or buffer), the block table
  (names, parameter names and shapes, owning rank and shard file), per file its size and
  **sha256**, the step and the world size. Files are written with ``libver=v110`` so the
  HDF5 1.10 command line tools read them.
* No pickle anywhere: loading reads numbers and JSON, never executes code.

Protocol of :func:`save_checkpoint` (collective: every rank calls it)::

    rank 0: mkdir .tmp-step-S-<token>      -> broadcast name; every rank checks it sees the
                                              directory (node-local storage -> clear error)
    every rank: write shard (+ rank 0: common.h5), flush, fsync, sha256
    allgather(success, size, digest)       -> any failure: all ranks raise, tmp dir removed
    rank 0: check every shard is visible, write manifest.json, fsync file and directory,
            rename .tmp-step-S-<token> -> step-S, fsync checkpoints/, replace `latest`
            (write + fsync + os.replace), delete all but the newest `keep` checkpoints
    broadcast(outcome)                     -> every rank returns the same path or raises

Restart (:func:`load_checkpoint`, collective) works on any world size: rank 0 resolves the
checkpoint and broadcasts the manifest; the optimizer, built for the new world size, knows the
blocks it owns, and each rank opens only ``common.h5``, the shards holding its blocks and the
shard of rank ``rank % saved_world_size`` for its RNG states (per-rank streams such as dropout
masks continue exactly only on the same world size; streams seeded identically on all ranks,
e.g. data shuffling, continue exactly on any world size). Every file a rank opens is checked
against its manifest sha256 first. Reads are staged, success is agreed with an all-gather, and
only then is anything modified, so an error on one rank raises the same
:class:`CheckpointError` on every rank instead of hanging the job.

Auto-resume (:func:`find_latest_valid`, :func:`resume`) scans ``step-*`` directories newest
step first and skips, with a warning, any whose files do not match their digests. The
``latest`` pointer is for people and shell scripts; auto-resume does not trust it, because a
pointer cannot tell that its target was damaged later. A run directory is assumed to belong to
one job: stale ``.tmp-*`` directories are deleted by the next successful save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import operator
import os
import random
import re
import shutil
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .comm import LocalCommunicator
from .curvature import CURVATURE_STATE_KEYS
from .optimizer import FLAT_STATE_KEYS, MLBFGS

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_VERSION", "CheckpointError", "CheckpointCorruptError", "CheckpointMismatchError",
    "CheckpointSchemaError", "CheckpointStorageError", "CheckpointInfo", "LoadedCheckpoint",
    "CheckpointReader", "save_checkpoint", "load_checkpoint", "resume", "find_latest_valid",
    "list_checkpoints", "verify_checkpoint", "resolve_checkpoint", "diff_checkpoints",
    "read_latest_pointer", "read_manifest", "checkpoint_summary", "model_state_dict",
    "checkpoints_dir", "is_checkpoint_dir", "step_dir_name", "shard_name", "RngState",
]

#: Version of the on-disk layout described in the module docstring.
SCHEMA_VERSION = 1
FORMAT_NAME = "mlbfgs-hpc-checkpoint"
MANIFEST_NAME = "manifest.json"
COMMON_NAME = "common.h5"
LATEST_NAME = "latest"
CHECKPOINTS_DIRNAME = "checkpoints"
#: Per-block datasets every shard must hold for an mL-BFGS block.
BLOCK_STATE_KEYS: tuple[str, ...] = (*FLAT_STATE_KEYS, *CURVATURE_STATE_KEYS)

_STEP_DIR = re.compile(r"^step-(\d{6,})$")
_TMP_DIR = re.compile(r"^\.(?:tmp|old)-step-(\d{6,})-[0-9a-f]+$")
_CHUNK_BYTES = 4 << 20
# HDF5 1.10 file format: large attributes (dense storage) and readable by the 1.10 CLI tools.
_LIBVER = ("v110", "v110")
# Dtypes numpy lacks: stored as their bit pattern in a same-size integer type.
_BIT_VIEWS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        _BIT_VIEWS[getattr(torch, _name)] = torch.uint8

#: How long each rank polls for the temporary directory rank 0 created before concluding that
#: the run directory is not on shared storage (metadata of shared file systems can lag).
VISIBILITY_WAIT_S = 5.0
#: Test seam: called by rank 0 with the temporary directory after every shard is written and
#: before the manifest is (fault-injection tests use it to kill a job mid-write).
_BEFORE_MANIFEST_HOOK: Callable[[Path], None] | None = None

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


# ---- errors and records ----------------------------------------------------------------------
class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message names the file or the entry."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or fails its sha256 or fletcher32 check."""


class CheckpointMismatchError(CheckpointError):
    """The model or optimizer does not match what the checkpoint was written from."""


class CheckpointSchemaError(CheckpointError):
    """The manifest is not a checkpoint manifest this version understands."""


class CheckpointStorageError(CheckpointError):
    """The run directory is not shared by all ranks, or could not be written."""


_ERROR_CLASSES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls for cls in (CheckpointError, CheckpointCorruptError,
                                  CheckpointMismatchError, CheckpointSchemaError,
                                  CheckpointStorageError)}


@dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored.

    Attributes:
        path: the checkpoint directory.
        step: the training step it was written at.
        world_size: the number of ranks that wrote it.
        extra: the caller's ``extra`` dict (data-order position etc.).
        config: the run configuration given to :func:`save_checkpoint`.
        manifest: the whole manifest.
    """

    path: Path
    step: int
    world_size: int
    extra: dict[str, Any]
    config: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`.

    Attributes:
        path: the checkpoint directory.
        step: its step (from the manifest, or from the directory name when unreadable).
        world_size: ranks that wrote it, ``None`` when the manifest is unreadable.
        bytes: total size of its files on disk.
        valid: digests and manifest check out; ``None`` when not checked.
        complete: ``False`` for a ``.tmp-*`` directory left by an interrupted write.
        latest: the ``latest`` pointer names it.
        problems: why it is not valid.
    """

    path: Path
    step: int
    world_size: int | None
    bytes: int
    valid: bool | None
    complete: bool = True
    latest: bool = False
    problems: tuple[str, ...] = ()


# ---- paths -------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (``step-000100``)."""
    return f"step-{step:06d}"


def shard_name(rank: int, world_size: int) -> str:
    """File name of ``rank``'s shard (``shard-00001-of-00004.h5``)."""
    return f"shard-{rank:05d}-of-{world_size:05d}.h5"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """Where the checkpoints of ``run_dir`` live: ``run_dir/checkpoints``, or ``run_dir``
    itself when it already is such a directory (holds ``step-*`` entries or ``latest``)."""
    run_dir = Path(run_dir)
    nested = run_dir / CHECKPOINTS_DIRNAME
    if nested.is_dir():
        return nested
    if run_dir.is_dir() and ((run_dir / LATEST_NAME).exists() or any(
            _STEP_DIR.match(p.name) or _TMP_DIR.match(p.name) for p in run_dir.iterdir())):
        return run_dir
    return nested


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories under ``root``, newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, key=lambda item: item[0], reverse=True)


def read_latest_pointer(run_dir: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (it may since have been damaged)."""
    pointer = checkpoints_dir(run_dir) / LATEST_NAME
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return pointer.parent / name if _STEP_DIR.match(name) else None


def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a checkpoint directory (a ``step-*`` directory or one holding a manifest)."""
    path = Path(path)
    return path.is_dir() and (bool(_STEP_DIR.match(path.name)) or
                              (path / MANIFEST_NAME).exists())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; a run directory: its newest valid checkpoint.

    Raises:
        CheckpointError: ``path`` does not exist or holds no valid checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_checkpoint_dir(path):
        return path
    if _TMP_DIR.match(path.name):
        raise CheckpointCorruptError(
            f"{path} is the temporary directory of an interrupted checkpoint write; "
            f"it is incomplete and cannot be loaded")
    latest = find_latest_valid(path)
    if latest is None:
        raise CheckpointError(f"no valid checkpoint found under {path}")
    return latest


# ---- low level: files, digests, tensors ---------------------------------------------------------
def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _open_h5(path: Path, mode: str = "r") -> h5py.File:
    # No HDF5 file locking: parallel file systems often lack flock, and the write protocol
    # never lets anybody open a file that is still being written.
    if mode == "r":
        return h5py.File(path, "r", locking=False)
    return h5py.File(path, mode, libver=_LIBVER, locking=False)


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunks of at most ``_CHUNK_BYTES`` (big chunks: few checksums, fast sequential IO)."""
    chunk = [max(1, d) for d in shape]
    while math.prod(chunk) * itemsize > _CHUNK_BYTES and any(c > 1 for c in chunk):
        i = max(range(len(chunk)), key=chunk.__getitem__)
        chunk[i] = (chunk[i] + 1) // 2
    return tuple(chunk)


def _write_array(group: h5py.Group, name: str, array: np.ndarray) -> h5py.Dataset:
    """A chunked, fletcher32-checked dataset (0-d arrays become shape (1,) with scalar=1)."""
    scalar = array.ndim == 0
    if scalar:
        array = array.reshape(1)
    # A zero-length axis cannot hold a chunk unless it is extendible.
    maxshape = tuple(None if d == 0 else d for d in array.shape)
    dataset = group.create_dataset(
        name, data=array, chunks=_chunk_shape(array.shape, array.itemsize),
        maxshape=maxshape, fletcher32=True)
    if scalar:
        dataset.attrs["scalar"] = 1
    return dataset


def _write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor) -> h5py.Dataset:
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    view = _BIT_VIEWS.get(tensor.dtype)
    array = (tensor.view(view) if view is not None else tensor).numpy()
    dataset = _write_array(group, name, array)
    dataset.attrs["torch_dtype"] = str(tensor.dtype).removeprefix("torch.")
    return dataset


def _read_array(dataset: h5py.Dataset) -> np.ndarray:
    """Read a whole dataset (verifying fletcher32); errors name the file and the dataset."""
    try:
        array = dataset[()]
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{dataset.file.filename}: dataset {dataset.name} is unreadable or fails its "
            f"fletcher32 checksum: {exc}") from exc
    if int(dataset.attrs.get("scalar", 0)):
        array = array.reshape(())
    return array


def _read_tensor(dataset: h5py.Dataset) -> torch.Tensor:
    array = _read_array(dataset)
    dtype_name = dataset.attrs.get("torch_dtype")
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointCorruptError(f"{dataset.file.filename}: dataset {dataset.name} has no "
                                     f"valid torch_dtype attribute ({dtype_name!r})")
    # h5py returns a fresh C-ordered array (np.ascontiguousarray would turn 0-d into 1-d).
    tensor = torch.from_numpy(array)
    if dtype in _BIT_VIEWS:
        tensor = tensor.view(dtype)
    if tensor.dtype != dtype:
        raise CheckpointCorruptError(f"{dataset.file.filename}: dataset {dataset.name} holds "
                                     f"{tensor.dtype}, its attribute says {dtype}")
    return tensor


def _quote(part: str) -> str:
    quoted = urllib.parse.quote(part, safe="")
    return {"": "%00", ".": "%2E", "..": "%2E%2E"}.get(quoted, quoted)


# ---- nested state without pickle: JSON skeleton + tensor datasets ------------------------------
class _TreeWriter:
    """Encodes nested state as a JSON skeleton, writing each tensor as a dataset."""

    def __init__(self, group: h5py.Group) -> None:
        self._group = group
        self._names: set[str] = set()

    def encode(self, obj: Any, parts: tuple[str, ...] = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            name = "/".join(_quote(p) for p in parts) or "value"
            base, n = name, 1
            while name in self._names:  # e.g. keys 0 and "0" in one dict
                name, n = f"{base}~{n}", n + 1
            self._names.add(name)
            _write_tensor(self._group, name, obj)
            return {_TENSOR: name}
        if isinstance(obj, (list, tuple)) and not isinstance(obj, str):
            items = [self.encode(v, parts + (str(i),)) for i, v in enumerate(obj)]
            return items if isinstance(obj, list) else {_TUPLE: items}
        if isinstance(obj, Mapping):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, parts + (k,)) for k, v in obj.items()}
            return {_DICT: [[_encode_plain(k, parts), self.encode(v, parts + (str(k),))]
                            for k, v in obj.items()]}
        return _encode_plain(obj, parts)


def _encode_plain(obj: Any, parts: tuple[str, ...]) -> Any:
    """JSON value of a number, string, bool or None (tuples allowed: dict keys)."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return operator.index(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode_plain(v, parts + (str(i),)) for i, v in enumerate(obj)]}
    where = "/".join(parts) or "<root>"
    raise CheckpointError(
        f"cannot store a {type(obj).__name__} at '{where}' without pickle (supported: tensors, "
        f"numbers, strings, bools, None, lists, tuples, dicts)")


def _write_tree(group: h5py.Group, obj: Any) -> None:
    group.attrs["tree"] = json.dumps(_TreeWriter(group).encode(obj), allow_nan=False)


def _decode(node: Any, load: Callable[[str], Any]) -> Any:
    if isinstance(node, list):
        return [_decode(v, load) for v in node]
    if isinstance(node, dict):
        if len(node) == 1:
            ((key, value),) = node.items()
            if key == _TENSOR:
                return load(value)
            if key == _TUPLE:
                return tuple(_decode(v, load) for v in value)
            if key == _DICT:
                return {_decode(k, load): _decode(v, load) for k, v in value}
            if key == _FLOAT:
                return float(value)
        return {k: _decode(v, load) for k, v in node.items()}
    return node


def _read_tree(group: h5py.Group, *, lazy: bool = False) -> Any:
    """Decode a tree; ``lazy`` leaves a zero-argument loader in place of each tensor."""
    try:
        skeleton = json.loads(group.attrs["tree"])
    except (KeyError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"{group.file.filename}: group {group.name} lacks a valid 'tree' attribute") from exc

    def load(name: str) -> Any:
        if name not in group:
            raise CheckpointCorruptError(f"{group.file.filename}: dataset {group.name}/{name} "
                                         f"named in the tree is missing")
        if lazy:
            return _LazyTensor(group[name])
        return _read_tensor(group[name])

    return _decode(skeleton, load)


class _LazyTensor:
    """A tensor dataset read on demand (for diffing big checkpoints one tensor at a time)."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset

    def __call__(self) -> torch.Tensor:
        return _read_tensor(self.dataset)


# ---- RNG states ------------------------------------------------------------------------------------
def _write_rng(group: h5py.Group) -> None:
    _write_tensor(group, "torch", torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = group.create_group("cuda")
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            _write_tensor(cuda, str(i), state)
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    dataset = _write_array(group, "numpy_keys", np.asarray(keys, dtype=np.uint32))
    dataset.attrs.update({"algorithm": name, "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)})
    version, internal, gauss_next = random.getstate()
    dataset = _write_array(group, "python_state", np.asarray(internal, dtype=np.int64))
    dataset.attrs.update({"version": int(version), "gauss_next": json.dumps(gauss_next)})


@dataclass(kw_only=True)
class RngState:
    """The RNG states one rank saved; :meth:`restore` installs them in this process.

    Args:
        torch_state: ``torch.get_rng_state()``.
        cuda_states: ``torch.cuda.get_rng_state_all()`` (empty when CUDA was not in use).
        numpy_state: the legacy global ``np.random.get_state()`` tuple.
        python_state: ``random.getstate()``.
    """

    torch_state: torch.Tensor
    cuda_states: list[torch.Tensor]
    numpy_state: tuple[Any, ...]
    python_state: tuple[Any, ...]

    def restore(self) -> None:
        torch.set_rng_state(self.torch_state)
        if self.cuda_states and torch.cuda.is_available():
            if len(self.cuda_states) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(self.cuda_states)
            else:
                logger.warning("checkpoint holds %d CUDA RNG states, this process sees %d "
                               "devices: CUDA RNG not restored", len(self.cuda_states),
                               torch.cuda.device_count())
        np.random.set_state(self.numpy_state)
        random.setstate(self.python_state)


def _read_rng(group: h5py.Group) -> RngState:
    keys = group["numpy_keys"]
    py = group["python_state"]
    cuda = group.get("cuda")
    return RngState(
        torch_state=_read_tensor(group["torch"]),
        cuda_states=[_read_tensor(cuda[k]) for k in sorted(cuda, key=int)] if cuda else [],
        numpy_state=(str(keys.attrs["algorithm"]), _read_array(keys), int(keys.attrs["pos"]),
                     int(keys.attrs["has_gauss"]), float(keys.attrs["cached_gaussian"])),
        python_state=(int(py.attrs["version"]), tuple(int(v) for v in _read_array(py)),
                      json.loads(py.attrs["gauss_next"])),
    )


# ---- what goes into the files ---------------------------------------------------------------
def _model_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    params = {name for name, _ in model.named_parameters()}
    return [{"name": name, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix(
        "torch."), "kind": "parameter" if name in params else "buffer"}
        for name, value in model.state_dict().items() if isinstance(value, torch.Tensor)]


def _optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    return "mlbfgs" if isinstance(optimizer, MLBFGS) else "torch"


def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _block_table(optimizer: MLBFGS, world_size: int) -> list[dict[str, Any]]:
    owner = optimizer.ownership.owner
    return [{"index": b, "name": block.name, "param_names": list(block.param_names),
             "shapes": [list(s) for s in block.shapes], "numel": block.numel,
             "rank": owner[b], "shard": shard_name(owner[b], world_size)}
            for b, block in enumerate(optimizer.blocks)]


def _file_attrs(kind: str, *, step: int, world_size: int) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "kind": kind,
            "step": step, "world_size": world_size}


def _write_shard(path: Path, *, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
                 step: int, host: str) -> list[int]:
    owned: list[int] = []
    with _open_h5(path, "w") as f:
        f.attrs.update({**_file_attrs("shard", step=step, world_size=world_size),
                        "rank": rank, "host": host})
        blocks = f.create_group("blocks")
        if isinstance(optimizer, MLBFGS):
            for b in optimizer.owned_blocks:
                block = optimizer.blocks[b]
                group = blocks.create_group(f"{b:06d}")
                group.attrs.update({"name": block.name, "numel": block.numel,
                                    "param_names": json.dumps(list(block.param_names))})
                for key, tensor in optimizer.block_state(b).items():
                    _write_tensor(group, key, tensor)
                owned.append(b)
        _write_rng(f.create_group("rng"))
    return owned


def _write_common(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, step: int, world_size: int) -> None:
    with _open_h5(path, "w") as f:
        f.attrs.update(_file_attrs("common", step=step, world_size=world_size))
        group = f.create_group("model")
        for name, value in model.state_dict().items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"model state entry {name!r} is a "
                                      f"{type(value).__name__}, not a tensor: not supported")
            _write_tensor(group, _quote(name), value)
        if isinstance(optimizer, MLBFGS):
            # Block state lives in the shards, written by each owner from block_state().
            state = optimizer.state_dict(include_blocks=False)
            del state["state"]
        else:
            state = optimizer.state_dict()
        group = f.create_group("optimizer")
        group.attrs.update({"kind": _optimizer_kind(optimizer), "class": _class_path(optimizer)})
        _write_tree(group, state)
        if scheduler is not None:
            group = f.create_group("scheduler")
            group.attrs["class"] = _class_path(scheduler)
            _write_tree(group, scheduler.state_dict())


def _json_checked(name: str, value: dict[str, Any] | None) -> dict[str, Any]:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of JSON values or None, got "
                         f"{type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold only JSON values (finite numbers, strings, bools, "
                         f"None, lists, dicts with string keys): {exc}") from exc


def _versions() -> dict[str, str]:
    import platform

    from . import __version__  # lazily: the package may import this module during init

    return {"mlbfgs_hpc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "python": platform.python_version()}


# ---- collective helpers -----------------------------------------------------------------------
def _failure(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, CheckpointError):
        return type(exc).__name__, str(exc)
    return "CheckpointError", f"{type(exc).__name__}: {exc}"


def _agree(comm: LocalCommunicator, failure: tuple[str, str] | None, action: str) -> None:
    """All-gather each rank's failure; raise the same error on every rank if any failed."""
    gathered = comm.allgather_object(
        None if failure is None else (failure[0], failure[1], comm.hostname))
    bad = [(rank, item) for rank, item in enumerate(gathered) if item is not None]
    if not bad:
        return
    classes = {item[0] for _, item in bad}
    cls = _ERROR_CLASSES.get(classes.pop(), CheckpointError) if len(classes) == 1 \
        else CheckpointError
    if comm.size == 1:
        raise cls(bad[0][1][1])
    by_message: dict[str, list[str]] = {}
    for rank, (_, message, host) in bad:
        by_message.setdefault(message, []).append(f"{rank} ({host})")
    details = "; ".join(f"rank {', '.join(ranks)}: {message}"
                        for message, ranks in by_message.items())
    raise cls(f"{action} failed on {len(bad)} of {comm.size} ranks: {details}")


def _check_comm(comm: LocalCommunicator, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, MLBFGS) and (optimizer.comm.size != comm.size
                                          or optimizer.comm.rank != comm.rank):
        raise ValueError(f"comm (rank {comm.rank} of {comm.size}) must be the optimizer's "
                         f"communicator (rank {optimizer.comm.rank} of {optimizer.comm.size})")


# ---- save ------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: str | Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: LocalCommunicator,
                    scheduler: Any = None, extra: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, keep: int = 3) -> Path:
    """Write a checkpoint of ``step`` under ``run_dir/checkpoints`` (collective).

    Every rank must call it at the same point with the same arguments. The checkpoint is
    complete (manifest written, directory renamed, ``latest`` updated, old ones pruned) when
    the call returns on any rank.

    Args:
        run_dir: the run directory, on storage shared by all ranks.
        step: the training step (an integer >= 0); names the directory ``step-%06d``. An
            existing checkpoint of the same step is replaced.
        model: the model; rank 0 writes its ``state_dict()`` (parameters and buffers).
        optimizer: :class:`~mlbfgs_hpc.MLBFGS` (each rank writes the blocks it owns) or any
            ``torch.optim`` optimizer (replicated; rank 0 writes its ``state_dict()``).
        comm: the communicator (the optimizer's, for mL-BFGS).
        scheduler: an LR scheduler whose ``state_dict()`` is saved, or ``None``.
        extra: JSON values the caller needs to continue, e.g. the data-order position
            ``{"epoch": 3, "batch_index": 120}``.
        config: JSON run configuration, stored in the manifest.
        keep: how many of the newest checkpoints to keep (an integer >= 1).

    Returns:
        The checkpoint directory (the same path on every rank).

    Raises:
        ValueError: an argument is out of range or ``extra``/``config`` is not JSON.
        CheckpointStorageError: the run directory is not visible on every rank (node-local
            storage) or cannot be created; the message names the host and the path.
        CheckpointError: writing failed on some rank (raised on every rank, naming it).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    extra = _json_checked("extra", extra)
    config = _json_checked("config", config)
    _check_comm(comm, optimizer)
    started = time.perf_counter()
    rank, size = comm.rank, comm.size
    root = Path(run_dir) / CHECKPOINTS_DIRNAME
    final = root / step_dir_name(step)

    # 1. Rank 0 creates the temporary directory; every rank must see it (shared storage).
    created: tuple[str | None, str | None] | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
            created = (str(tmp), None)
        except OSError as exc:
            created = (None, f"cannot create a checkpoint directory under {root} on host "
                             f"{comm.hostname}: {exc}")
    tmp_name, error = comm.broadcast_object(created)
    if error is not None:
        raise CheckpointStorageError(error)
    tmp = Path(tmp_name)
    deadline = time.monotonic() + VISIBILITY_WAIT_S
    while not tmp.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = comm.allgather_object((tmp.is_dir(), comm.hostname))
    blind = [f"rank {r} on host {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointStorageError(
            f"checkpoint directory {tmp}, created by rank 0 on host {seen[0][1]}, is not "
            f"visible to {', '.join(blind)}: the run directory must be on a file system "
            f"shared by all ranks (node-local scratch cannot hold a sharded checkpoint)")

    # 2. Every rank writes its shard (rank 0 also the common file), fsyncs and digests it.
    result: dict[str, Any] | None = None
    failure: tuple[str, str] | None = None
    try:
        shard = tmp / shard_name(rank, size)
        blocks = _write_shard(shard, optimizer=optimizer, rank=rank, world_size=size,
                              step=step, host=comm.hostname)
        _fsync_path(shard)
        files = {shard.name: {"bytes": shard.stat().st_size, "sha256": _sha256(shard)}}
        if rank == 0:
            common = tmp / COMMON_NAME
            _write_common(common, model=model, optimizer=optimizer, scheduler=scheduler,
                          step=step, world_size=size)
            _fsync_path(common)
            files[COMMON_NAME] = {"bytes": common.stat().st_size, "sha256": _sha256(common)}
        result = {"rank": rank, "host": comm.hostname, "blocks": blocks, "files": files}
    except Exception as exc:  # any failure must reach the other ranks instead of hanging them
        failure = _failure(exc)
    gathered = comm.allgather_object((result, failure and (*failure, comm.hostname)))
    failed = [(r, f) for r, (_, f) in enumerate(gathered) if f is not None]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        details = "; ".join(f"rank {r} (host {f[2]}): {f[1]}" for r, f in failed)
        raise CheckpointError(f"checkpoint of step {step} not written: {details}")

    # 3. Rank 0 checks, writes the manifest last, renames, points `latest`, prunes.
    outcome: tuple[str | None, str | None] | None = None
    if rank == 0:
        try:
            results = [r for r, _ in gathered]
            manifest = _finalize(tmp, final, results=results, step=step, model=model,
                                 optimizer=optimizer, scheduler=scheduler, extra=extra,
                                 config=config, world_size=size, keep=keep)
            total = sum(f["bytes"] for f in manifest["files"].values())
            logger.info("checkpoint step %d written to %s: %d files, %.1f MiB, %.2f s",
                        step, final, len(manifest["files"]), total / 2**20,
                        time.perf_counter() - started)
            outcome = (str(final), None)
        except Exception as exc:  # reported to every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = (None, f"checkpoint of step {step} not completed: {_failure(exc)[1]}")
    final_name, error = comm.broadcast_object(outcome)
    if error is not None:
        raise CheckpointError(error)
    return Path(final_name)


def _finalize(tmp: Path, final: Path, *, results: list[dict[str, Any]], step: int,
              model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              extra: dict[str, Any], config: dict[str, Any], world_size: int,
              keep: int) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for result in results:
        for name, info in result["files"].items():
            path = tmp / name
            # The other ranks' files must be visible here too, or the storage is not shared.
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise CheckpointStorageError(
                    f"{path}, written by rank {result['rank']} on host {result['host']}, is "
                    f"not visible (or has another size) on rank 0's host: the run directory "
                    f"must be on a file system shared by all ranks")
            files[name] = {**info, "rank": result["rank"], "host": result["host"]}
    if _BEFORE_MANIFEST_HOOK is not None:
        _BEFORE_MANIFEST_HOOK(tmp)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "config": config,
        "extra": extra,
        "optimizer": {"kind": _optimizer_kind(optimizer), "class": _class_path(optimizer)},
        "scheduler": None if scheduler is None else _class_path(scheduler),
        "model": _model_table(model),
        "blocks": _block_table(optimizer, world_size) if isinstance(optimizer, MLBFGS) else [],
        "shards": [{"rank": r["rank"], "host": r["host"], "file": shard_name(r["rank"],
                    world_size), "blocks": r["blocks"]} for r in results],
        "files": files,
    }
    if isinstance(optimizer, MLBFGS):
        manifest["optimizer"]["config"] = optimizer.config.to_dict()
    manifest_path = tmp / MANIFEST_NAME
    with manifest_path.open("w", encoding="utf-8") as fh:
        fh.write(_json_text(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_path(tmp, directory=True)
    root = final.parent
    replaced: Path | None = None
    if final.exists():
        # Same step written again (e.g. after a restart): move the old one aside first,
        # because a directory cannot be renamed onto a non-empty one.
        replaced = root / f".old-{final.name}-{uuid.uuid4().hex[:12]}"
        os.rename(final, replaced)
        logger.warning("replacing existing checkpoint %s", final)
    os.rename(tmp, final)
    _fsync_path(root, directory=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    # The checkpoint is complete from here on: housekeeping failures only warn.
    try:
        pointer_tmp = root / f".{LATEST_NAME}.{uuid.uuid4().hex[:12]}"
        with pointer_tmp.open("w", encoding="utf-8") as fh:
            fh.write(final.name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, root / LATEST_NAME)
        _fsync_path(root, directory=True)
        _prune(root, keep=keep, current=final)
    except OSError as exc:
        logger.warning("checkpoint %s is complete, but updating %s or pruning old "
                       "checkpoints failed: %s", final, root / LATEST_NAME, exc)
    return manifest


def _prune(root: Path, *, keep: int, current: Path) -> None:
    """Delete all but the ``keep`` newest checkpoints and leftovers of interrupted writes."""
    dirs = _step_dirs(root)
    newer = [p.name for s, p in dirs if s > int(_STEP_DIR.match(current.name).group(1))]
    if newer:
        logger.warning("checkpoints with a later step than %s exist (%s): auto-resume "
                       "picks the newest step", current.name, ", ".join(newer))
    for _, path in dirs[keep:]:
        if path != current:
            logger.info("deleting old checkpoint %s (keep=%d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.is_dir() and _TMP_DIR.match(path.name):
            logger.info("deleting %s left by an interrupted checkpoint write", path)
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{LATEST_NAME}."):
            path.unlink(missing_ok=True)


# ---- manifest and integrity checks -------------------------------------------------------------
def _json_text(value: Any, indent: str = "") -> str:
    """Indented JSON with short nested values (shapes, table rows) kept on one line."""
    inner = indent + "  "
    compact = json.dumps(value, allow_nan=False)
    if indent and len(compact) <= 96:
        return compact
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_json_text(v, inner).strip()}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" + ("\n" if not indent else "")
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{_json_text(v, inner).strip()}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(value, allow_nan=False)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, schema-checked.

    Raises:
        CheckpointCorruptError: the manifest is missing or not valid JSON.
        CheckpointSchemaError: it is not a checkpoint manifest of a known schema version.
    """
    file = Path(path) / MANIFEST_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{file} is missing: {path} is not a complete checkpoint") from None
    except OSError as exc:
        raise CheckpointCorruptError(f"{file} cannot be read: {exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CheckpointCorruptError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointSchemaError(f"{file} is not an {FORMAT_NAME} manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointSchemaError(
            f"{file}: unsupported checkpoint schema version {version!r}; this mlbfgs-hpc "
            f"reads schema version {SCHEMA_VERSION}")
    for key in ("step", "world_size", "files", "shards", "model", "blocks", "optimizer"):
        if key not in manifest:
            raise CheckpointSchemaError(f"{file} lacks the field {key!r}")
    return manifest


def _check_file(ckpt: Path, name: str, info: Mapping[str, Any], *,
                digest: bool = True) -> str | None:
    """Why file ``name`` of a checkpoint fails its manifest entry, or ``None``."""
    path = ckpt / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    if size != info.get("bytes"):
        return f"{path} has {size} bytes, the manifest says {info.get('bytes')} (truncated?)"
    if digest and _sha256(path) != info.get("sha256"):
        return f"{path} fails its sha256 check (corrupt)"
    return None


def _digest_problems(ckpt: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError as exc:
        return None, [str(exc)]
    expected = {COMMON_NAME} | {shard_name(r, manifest["world_size"])
                                for r in range(manifest["world_size"])}
    problems = [f"{ckpt / name} is not listed in the manifest"
                for name in sorted(expected - set(manifest["files"]))]
    problems += [p for name, info in sorted(manifest["files"].items())
                 if (p := _check_file(ckpt, name, info)) is not None]
    return manifest, problems


def find_latest_valid(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose manifest and file digests check out.

    Damaged or incomplete newer checkpoints are skipped with a warning naming the problem.
    Not collective: :func:`resume` calls it on rank 0 and broadcasts the answer.
    """
    for step, path in _step_dirs(checkpoints_dir(run_dir)):
        _, problems = _digest_problems(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s (step %d): %s; falling back to an older one",
                       path, step, "; ".join(problems))
    return None


def list_checkpoints(run_dir: str | Path, *, check: bool = True,
                     include_incomplete: bool = False) -> list[CheckpointInfo]:
    """The checkpoints of ``run_dir``, oldest step first.

    Args:
        run_dir: a run directory or its ``checkpoints`` directory.
        check: verify manifests and sha256 digests (reads every file).
        include_incomplete: also list ``.tmp-*`` directories of interrupted writes.
    """
    root = checkpoints_dir(run_dir)
    latest = read_latest_pointer(run_dir)
    infos: list[CheckpointInfo] = []
    for step, path in reversed(_step_dirs(root)):
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        if check:
            manifest, problems = _digest_problems(path)
        else:
            try:
                manifest, problems = read_manifest(path), []
            except CheckpointError as exc:
                manifest, problems = None, [str(exc)]
        infos.append(CheckpointInfo(
            path=path, step=manifest["step"] if manifest else step,
            world_size=manifest["world_size"] if manifest else None, bytes=size,
            valid=(not problems) if check or problems else None, latest=path == latest,
            problems=tuple(problems)))
    if include_incomplete and root.is_dir():
        for path in sorted(root.iterdir()):
            if path.is_dir() and (m := _TMP_DIR.match(path.name)):
                infos.append(CheckpointInfo(
                    path=path, step=int(m.group(1)), world_size=None,
                    bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
                    valid=False, complete=False,
                    problems=("incomplete: left by an interrupted checkpoint write",)))
    return infos


def verify_checkpoint(path: str | Path) -> list[str]:
    """Every problem of a checkpoint; empty when it is valid.

    Checks the manifest and schema, every file's size and sha256, reads every dataset (which
    verifies its fletcher32 checksum) and checks that every block of the block table and every
    model entry is present with the recorded shape. ``path`` may be a run directory (its
    newest valid checkpoint is verified).
    """
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as exc:
        return [str(exc)]
    manifest, problems = _digest_problems(ckpt)
    if manifest is None:
        return problems
    for name in sorted(manifest["files"]):
        file = ckpt / name
        if not file.is_file():
            continue
        try:
            with _open_h5(file) as f:
                problems += _dataset_problems(f)
                problems += _structure_problems(f, name, manifest)
        except (OSError, ValueError) as exc:
            problems.append(f"{file} cannot be opened as HDF5: {exc}")
    return problems


def _dataset_problems(f: h5py.File) -> list[str]:
    problems: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            try:
                _read_array(obj)
            except CheckpointError as exc:
                problems.append(str(exc))

    f.visititems(visit)
    return problems


def _structure_problems(f: h5py.File, name: str, manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    where = f.filename
    if f.attrs.get("step") != manifest["step"] or \
            f.attrs.get("world_size") != manifest["world_size"]:
        problems.append(f"{where}: step/world_size attributes disagree with the manifest")
    if name == COMMON_NAME:
        for entry in manifest["model"]:
            key = f"model/{_quote(entry['name'])}"
            if key not in f:
                problems.append(f"{where}: model entry {entry['name']} is missing")
            elif _stored_shape(f[key]) != tuple(entry["shape"]):
                problems.append(f"{where}: model entry {entry['name']} has shape "
                                f"{_stored_shape(f[key])}, the manifest says {entry['shape']}")
        return problems
    for block in manifest["blocks"]:
        if block["shard"] != name:
            continue
        group = f.get(f"blocks/{block['index']:06d}")
        if group is None:
            problems.append(f"{where}: block {block['index']} ({block['name']}) is missing")
            continue
        missing = [key for key in BLOCK_STATE_KEYS if key not in group]
        if missing:
            problems.append(f"{where}: block {block['index']} lacks {missing}")
        elif _stored_shape(group["m_param"]) != (block["numel"],):
            problems.append(f"{where}: block {block['index']} has {group['m_param'].shape[0]} "
                            f"elements, the manifest says {block['numel']}")
    return problems


def _stored_shape(dataset: h5py.Dataset) -> tuple[int, ...]:
    return () if int(dataset.attrs.get("scalar", 0)) else tuple(dataset.shape)


# ---- reading -----------------------------------------------------------------------------------------
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
            problem = _check_file(self.path, name, info, digest=self.verify_digests)
            if problem is not None:
                raise CheckpointCorruptError(problem)
            try:
                self._files[name] = _open_h5(self.path / name)
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
            key = _quote(entry["name"])
            if key not in group:
                raise CheckpointCorruptError(f"{self.path / COMMON_NAME}: model entry "
                                             f"{entry['name']} is missing")
            state[entry["name"]] = _read_tensor(group[key])
        return state

    def optimizer_state(self, *, lazy: bool = False) -> Any:
        """The optimizer's state dict; for mL-BFGS without the per-block ``state``."""
        return _read_tree(self.file(COMMON_NAME)["optimizer"], lazy=lazy)

    def scheduler_state(self, *, lazy: bool = False) -> Any:
        """The LR scheduler's state dict, or ``None`` when none was saved."""
        group = self.file(COMMON_NAME).get("scheduler")
        return None if group is None else _read_tree(group, lazy=lazy)

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
        return {key: (_LazyTensor(group[key]) if lazy else _read_tensor(group[key]))
                for key in group}

    def rng_state(self, rank: int) -> RngState:
        """The RNG states rank ``rank`` saved."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {rank}")
        name = shard_name(rank, self.world_size)
        group = self.file(name).get("rng")
        if group is None:
            raise CheckpointCorruptError(f"{self.path / name}: group /rng is missing")
        return _read_rng(group)

    def entries(self, *, include_rng: bool = False) -> dict[str, Any]:
        """Every saved value under a stable key, tensors as lazy loaders.

        Keys do not depend on the world size (blocks are keyed by block index), so two
        checkpoints written on different numbers of ranks compare entry by entry.
        """
        out: dict[str, Any] = {}
        group = self.file(COMMON_NAME)["model"]
        for entry in self.manifest["model"]:
            out[f"model/{entry['name']}"] = _LazyTensor(group[_quote(entry["name"])])
        _flatten(self.optimizer_state(lazy=True), "optimizer", out)
        for block in range(len(self.manifest["blocks"])):
            for key, value in self.block_state(block, lazy=True).items():
                out[f"optimizer/blocks/{block:06d}/{key}"] = value
        _flatten(self.scheduler_state(lazy=True), "scheduler", out)
        _flatten(self.manifest.get("extra", {}), "extra", out)
        if include_rng:
            for rank in range(self.world_size):
                state = self.rng_state(rank)
                out[f"rng/{rank}/torch"] = state.torch_state
                out[f"rng/{rank}/numpy"] = torch.from_numpy(state.numpy_state[1].astype(
                    np.int64))
                out[f"rng/{rank}/python"] = torch.tensor(state.python_state[1])
        return out


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        if not node:
            out[prefix] = {}
        for key, value in node.items():
            _flatten(value, f"{prefix}/{key}", out)
    elif isinstance(node, (list, tuple)):
        if not node:
            out[prefix] = type(node)()
        for i, value in enumerate(node):
            _flatten(value, f"{prefix}/{i}", out)
    else:
        out[prefix] = node


# ---- load ------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class _Staged:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: Any
    rng: RngState | None


def _model_mismatch(manifest: dict[str, Any], model: torch.nn.Module, where: Path) -> None:
    saved = {e["name"]: e for e in manifest["model"]}
    mine = {e["name"]: e for e in _model_table(model)}
    problems: list[str] = []
    missing = [n for n in saved if n not in mine]
    unexpected = [n for n in mine if n not in saved]
    if missing:
        problems.append(f"in the checkpoint but not in the model: {', '.join(missing)}")
    if unexpected:
        problems.append(f"in the model but not in the checkpoint: {', '.join(unexpected)}")
    shapes = [f"{n}: checkpoint {tuple(saved[n]['shape'])} vs model {tuple(mine[n]['shape'])}"
              for n in saved if n in mine and saved[n]["shape"] != mine[n]["shape"]]
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes))
    if problems:
        raise CheckpointMismatchError(f"the model does not match checkpoint {where}: "
                                      + "; ".join(problems))
    dtypes = [f"{n} ({saved[n]['dtype']} -> {mine[n]['dtype']})"
              for n in saved if saved[n]["dtype"] != mine[n]["dtype"]]
    if dtypes:
        logger.warning("checkpoint %s: converting dtypes on load: %s", where, ", ".join(dtypes))


def _optimizer_mismatch(manifest: dict[str, Any], optimizer: torch.optim.Optimizer,
                        where: Path) -> None:
    saved = manifest["optimizer"]
    if saved["kind"] != _optimizer_kind(optimizer) or (
            saved["kind"] == "torch" and saved["class"] != _class_path(optimizer)):
        raise CheckpointMismatchError(f"checkpoint {where} holds the state of a "
                                      f"{saved['class']}, the optimizer is a "
                                      f"{_class_path(optimizer)}")
    if not isinstance(optimizer, MLBFGS):
        return
    table = manifest["blocks"]
    diffs = [f"block {b}: checkpoint {saved_b['name']} {saved_b['param_names']} "
             f"{saved_b['shapes']} vs optimizer {block.name} {list(block.param_names)} "
             f"{[list(s) for s in block.shapes]}"
             for b, (saved_b, block) in enumerate(zip(table, optimizer.blocks))
             if (saved_b["name"], saved_b["param_names"], saved_b["shapes"]) !=
             (block.name, list(block.param_names), [list(s) for s in block.shapes])]
    if len(table) != len(optimizer.blocks) or diffs:
        raise CheckpointMismatchError(
            f"the optimizer's blocks do not match checkpoint {where}: {len(table)} saved vs "
            f"{len(optimizer.blocks)} blocks; " + "; ".join(diffs[:5]))
    saved_config = saved.get("config", {})
    m_saved = saved_config.get("history_size")
    if m_saved != optimizer.config.history_size:
        raise CheckpointMismatchError(
            f"checkpoint {where} has history_size={m_saved}, the optimizer "
            f"history_size={optimizer.config.history_size}: the history rings cannot be loaded")
    changed = [f"{k}: {saved_config[k]!r} -> {v!r}"
               for k, v in optimizer.config.to_dict().items()
               if k in saved_config and saved_config[k] != v]
    if changed:
        logger.warning("optimizer configuration differs from checkpoint %s (the new values "
                       "apply): %s", where, ", ".join(changed))


def _stage(reader: CheckpointReader, *, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: Any, rank: int,
           restore_rng: bool) -> _Staged:
    """Everything this rank needs, read and checked, with nothing modified yet."""
    manifest = reader.manifest
    _model_mismatch(manifest, model, reader.path)
    _optimizer_mismatch(manifest, optimizer, reader.path)
    model_state = reader.model_state()
    optimizer_state = reader.optimizer_state()
    if isinstance(optimizer, MLBFGS):
        optimizer_state = {**optimizer_state,
                           "state": {b: reader.block_state(b) for b in optimizer.owned_blocks}}
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = reader.scheduler_state()
        if scheduler_state is None:
            logger.warning("checkpoint %s holds no LR scheduler state; the scheduler starts "
                           "fresh", reader.path)
        elif manifest.get("scheduler") != _class_path(scheduler):
            raise CheckpointMismatchError(
                f"checkpoint {reader.path} holds the state of a {manifest.get('scheduler')}, "
                f"the scheduler is a {_class_path(scheduler)}")
    rng = reader.rng_state(rank % reader.world_size) if restore_rng else None
    return _Staged(model_state=model_state, optimizer_state=optimizer_state,
                   scheduler_state=scheduler_state, rng=rng)


def _apply(staged: _Staged, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any, where: Path) -> None:
    try:
        model.load_state_dict(staged.model_state, strict=True)
        optimizer.load_state_dict(staged.optimizer_state)
        if scheduler is not None and staged.scheduler_state is not None:
            scheduler.load_state_dict(staged.scheduler_state)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointMismatchError(f"checkpoint {where} does not fit: {exc}") from exc
    if staged.rng is not None:
        staged.rng.restore()


def load_checkpoint(path: str | Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: LocalCommunicator,
                    scheduler: Any = None, restore_rng: bool = True,
                    verify_digests: bool = True) -> LoadedCheckpoint:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint (collective).

    The checkpoint may have been written on any number of ranks; the optimizer must be built
    for the current world size (it knows which blocks this rank owns).

    Args:
        path: a checkpoint directory, or a run directory (rank 0 picks its newest valid
            checkpoint and broadcasts the choice).
        model: the model; its parameter and buffer names and shapes must match.
        optimizer: the same kind of optimizer that wrote the checkpoint.
        comm: the communicator (the optimizer's, for mL-BFGS).
        scheduler: an LR scheduler to restore, or ``None``.
        restore_rng: restore the torch/numpy/python (and CUDA) RNG states; rank r gets
            those of saved rank ``r % saved_world_size``.
        verify_digests: check the sha256 of every file a rank opens.

    Returns:
        The step, ``extra``, ``config``, path and world size of the checkpoint.

    Raises:
        CheckpointMismatchError: model or optimizer do not match (names the entries).
        CheckpointSchemaError: unknown schema version.
        CheckpointCorruptError: a file is missing or damaged (names it).
        CheckpointError: any other failure. Every error is raised on every rank.
    """
    _check_comm(comm, optimizer)
    resolved: tuple[Any, ...] | None = None
    if comm.rank == 0:
        try:
            ckpt = resolve_checkpoint(path)
            resolved = (str(ckpt), read_manifest(ckpt), None)
        except CheckpointError as exc:
            resolved = (None, None, _failure(exc))
    ckpt_name, manifest, failure = comm.broadcast_object(resolved)
    if failure is not None:
        raise _ERROR_CLASSES.get(failure[0], CheckpointError)(failure[1])
    ckpt = Path(ckpt_name)

    staged: _Staged | None = None
    failure = None
    reader = CheckpointReader.from_manifest(path=ckpt, manifest=manifest,
                                            verify_digests=verify_digests)
    try:
        staged = _stage(reader, model=model, optimizer=optimizer, scheduler=scheduler,
                        rank=comm.rank, restore_rng=restore_rng)
    except Exception as exc:  # must reach the other ranks, see _agree
        failure = _failure(exc)
    finally:
        reader.close()
    _agree(comm, failure, f"loading checkpoint {ckpt}")
    assert staged is not None
    failure = None
    try:
        _apply(staged, model=model, optimizer=optimizer, scheduler=scheduler, where=ckpt)
    except Exception as exc:  # must reach the other ranks, see _agree
        failure = _failure(exc)
    _agree(comm, failure, f"applying checkpoint {ckpt}")
    if manifest["world_size"] != comm.size:
        logger.info("resumed a %d-rank checkpoint on %d ranks", manifest["world_size"],
                    comm.size)
    if comm.rank == 0:
        logger.info("loaded checkpoint %s (step %d)", ckpt, manifest["step"])
    return LoadedCheckpoint(path=ckpt, step=int(manifest["step"]),
                            world_size=int(manifest["world_size"]),
                            extra=dict(manifest.get("extra") or {}),
                            config=dict(manifest.get("config") or {}), manifest=manifest)


def resume(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           comm: LocalCommunicator, scheduler: Any = None,
           restore_rng: bool = True) -> LoadedCheckpoint | None:
    """Load the newest valid checkpoint of ``run_dir``, or return ``None`` (collective).

    Rank 0 scans the checkpoints (skipping damaged ones with a warning) and broadcasts its
    choice, so every rank loads the same one.
    """
    choice = None
    if comm.rank == 0:
        latest = find_latest_valid(run_dir)
        choice = None if latest is None else str(latest)
    choice = comm.broadcast_object(choice)
    if choice is None:
        if comm.rank == 0:
            logger.info("no valid checkpoint under %s: starting fresh", run_dir)
        return None
    return load_checkpoint(choice, model=model, optimizer=optimizer, comm=comm,
                           scheduler=scheduler, restore_rng=restore_rng)


# ---- diff ------------------------------------------------------------------------------------------
def _resolve_value(value: Any) -> Any:
    return value() if isinstance(value, _LazyTensor) else value


def _compare(a: Any, b: Any, atol: float | None) -> str | None:
    """Why ``a`` and ``b`` differ (bitwise when ``atol`` is None), or ``None``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"{a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if atol is None or not a.is_floating_point():
            fa, fb = a.reshape(-1).contiguous(), b.reshape(-1).contiguous()
            view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(
                fa.element_size())
            if view is not None and not fa.is_complex():
                differ = fa.view(view) != fb.view(view)
            else:
                differ = ~((fa == fb) | (torch.isnan(fa) & torch.isnan(fb)))
            n = int(differ.sum())
            if n == 0:
                return None
            if a.is_floating_point():
                delta = (fa.double() - fb.double()).abs().nan_to_num(nan=math.inf).max()
                return f"{n} of {fa.numel()} elements differ (max |a-b| = {float(delta):.3g})"
            return f"{n} of {fa.numel()} elements differ"
        both_nan = torch.isnan(a) & torch.isnan(b)
        delta = (a.double() - b.double()).abs().masked_fill(both_nan, 0.0)
        delta = delta.nan_to_num(nan=math.inf)
        worst = float(delta.max()) if delta.numel() else 0.0
        if worst <= atol:
            return None
        return (f"{int((delta > atol).sum())} of {a.numel()} elements differ by more than "
                f"{atol:g} (max |a-b| = {worst:.3g})")
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return f"{type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, float) and isinstance(b, float) and not isinstance(a, bool):
        if (math.isnan(a) and math.isnan(b)) or a == b:
            return None
        if atol is not None and abs(a - b) <= atol:
            return None
        return f"{a!r} vs {b!r}"
    return None if (type(a) is type(b) and a == b) else f"{a!r} vs {b!r}"


def diff_checkpoints(a: str | Path, b: str | Path, *, atol: float | None = None,
                     include_rng: bool = False) -> tuple[list[str], int]:
    """Differences between two checkpoints, compared entry by entry.

    Model entries, every optimizer tensor (mL-BFGS blocks by block index, whichever shard or
    world size wrote them), optimizer counters and param groups, scheduler state and ``extra``
    are compared; RNG states only with ``include_rng`` (they are per rank).

    Args:
        a: first checkpoint (or run directory).
        b: second checkpoint (or run directory).
        atol: absolute tolerance for floating values; ``None`` compares bitwise (NaN equals a
            NaN with the same bits).
        include_rng: also compare the per-rank RNG states.

    Returns:
        The list of differences (empty when they match) and the number of entries compared.
    """
    if atol is not None and not (math.isfinite(atol) and atol >= 0):
        raise ValueError(f"atol must be a finite number >= 0 or None, got {atol!r}")
    with CheckpointReader(path=a) as ra, CheckpointReader(path=b) as rb:
        ea = ra.entries(include_rng=include_rng)
        eb = rb.entries(include_rng=include_rng)
        diffs = [f"{key}: only in {ra.path}" for key in ea if key not in eb]
        diffs += [f"{key}: only in {rb.path}" for key in eb if key not in ea]
        compared = 0
        for key in ea:
            if key in eb:
                compared += 1
                reason = _compare(_resolve_value(ea[key]), _resolve_value(eb[key]), atol)
                if reason is not None:
                    diffs.append(f"{key}: {reason}")
    return diffs, compared


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
