"""Nested state without pickle: a JSON *skeleton* plus one dataset per tensor.

Nested state (torch optimizers, LR schedulers, mL-BFGS ``param_groups``/``config``/block
table) is stored as a JSON skeleton in the group attr ``tree`` in which every tensor is
replaced by ``{"__tensor__": "<dataset path relative to the group>"}``; tuples are
``{"__tuple__": [...]}``, dicts with non-string keys (the int parameter ids of torch
optimizers) ``{"__dict__": [[key, value], ...]}``, non-finite floats ``{"__float__": "nan"}``.
Dataset paths are the dict keys / list indices, URL-quoted (``/`` becomes ``%2F``). Loading
reads numbers and JSON and never executes code.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import h5py
import numpy as np
import torch

from .errors import CheckpointCorruptError, CheckpointError
from .h5io import quote_key, read_tensor, write_tensor

_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"

class _TreeWriter:
    """Encodes nested state as a JSON skeleton, writing each tensor as a dataset."""

    def __init__(self, group: h5py.Group) -> None:
        self._group = group
        self._names: set[str] = set()

    def encode(self, obj: Any, parts: tuple[str, ...] = ()) -> Any:
        if isinstance(obj, torch.Tensor):
            name = "/".join(quote_key(p) for p in parts) or "value"
            base, n = name, 1
            while name in self._names:  # e.g. keys 0 and "0" in one dict
                name, n = f"{base}~{n}", n + 1
            self._names.add(name)
            write_tensor(self._group, name, obj)
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


def write_tree(group: h5py.Group, obj: Any) -> None:
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


def read_tree(group: h5py.Group, *, lazy: bool = False) -> Any:
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
            return LazyTensor(group[name])
        return read_tensor(group[name])

    return _decode(skeleton, load)


class LazyTensor:
    """A tensor dataset read on demand (for diffing big checkpoints one tensor at a time)."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset = dataset

    def __call__(self) -> torch.Tensor:
        return read_tensor(self.dataset)

def flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping):
        if not node:
            out[prefix] = {}
        for key, value in node.items():
            flatten(value, f"{prefix}/{key}", out)
    elif isinstance(node, (list, tuple)):
        if not node:
            out[prefix] = type(node)()
        for i, value in enumerate(node):
            flatten(value, f"{prefix}/{i}", out)
    else:
        out[prefix] = node
