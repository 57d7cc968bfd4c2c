"""HDF5 primitives: the only module that opens HDF5 files (``h5py``).

Conventions of every dataset a checkpoint holds:

* chunked (chunks of at most 4 MiB), uncompressed, with the **fletcher32** filter, so any
  read of a damaged chunk fails;
* the attr ``torch_dtype`` on every tensor dataset (``bfloat16`` and the float8 types are
  stored as their bit pattern in a same-size integer type);
* HDF5 cannot chunk a 0-d dataset, so 0-d tensors are stored with shape ``(1,)`` and the attr
  ``scalar = 1``;
* files are written with ``libver=v110`` so the HDF5 1.10 command line tools read them.

Also the file-level helpers every writer needs: ``fsync`` of files and directories and the
sha256 digest the manifest records.
"""

from __future__ import annotations

import hashlib
import math
import os
import urllib.parse
from pathlib import Path

import h5py
import numpy as np
import torch

from .errors import CheckpointCorruptError

_CHUNK_BYTES = 4 << 20
# HDF5 1.10 file format: large attributes (dense storage) and readable by the 1.10 CLI tools.
_LIBVER = ("v110", "v110")
# Dtypes numpy lacks: stored as their bit pattern in a same-size integer type.
BIT_VIEWS: dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.int16}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        BIT_VIEWS[getattr(torch, _name)] = torch.uint8

def fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (os.O_DIRECTORY if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def open_h5(path: Path, mode: str = "r") -> h5py.File:
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


def write_array(group: h5py.Group, name: str, array: np.ndarray) -> h5py.Dataset:
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


def write_tensor(group: h5py.Group, name: str, tensor: torch.Tensor) -> h5py.Dataset:
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    view = BIT_VIEWS.get(tensor.dtype)
    array = (tensor.view(view) if view is not None else tensor).numpy()
    dataset = write_array(group, name, array)
    dataset.attrs["torch_dtype"] = str(tensor.dtype).removeprefix("torch.")
    return dataset


def read_array(dataset: h5py.Dataset) -> np.ndarray:
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


def read_tensor(dataset: h5py.Dataset) -> torch.Tensor:
    array = read_array(dataset)
    dtype_name = dataset.attrs.get("torch_dtype")
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointCorruptError(f"{dataset.file.filename}: dataset {dataset.name} has no "
                                     f"valid torch_dtype attribute ({dtype_name!r})")
    # h5py returns a fresh C-ordered array (np.ascontiguousarray would turn 0-d into 1-d).
    tensor = torch.from_numpy(array)
    if dtype in BIT_VIEWS:
        tensor = tensor.view(dtype)
    if tensor.dtype != dtype:
        raise CheckpointCorruptError(f"{dataset.file.filename}: dataset {dataset.name} holds "
                                     f"{tensor.dtype}, its attribute says {dtype}")
    return tensor


def quote_key(part: str) -> str:
    quoted = urllib.parse.quote(part, safe="")
    return {"": "%00", ".": "%2E", "..": "%2E%2E"}.get(quoted, quoted)

def stored_shape(dataset: h5py.Dataset) -> tuple[int, ...]:
    return () if int(dataset.attrs.get("scalar", 0)) else tuple(dataset.shape)
