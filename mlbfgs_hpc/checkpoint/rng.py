"""The RNG states a checkpoint saves per rank (group ``/rng`` of each shard).

::

    /rng/torch           uint8 torch.get_rng_state() of the rank that wrote the shard
    /rng/cuda/<i>        per CUDA device (only when CUDA was initialised)
    /rng/numpy_keys      uint32 (624,) legacy numpy MT19937 keys; attrs pos, has_gauss,
                         cached_gaussian
    /rng/python_state    int64 (625,) ``random.getstate()[1]``; attrs version, gauss_next (JSON)
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
import torch

from .h5io import read_array, read_tensor, write_array, write_tensor

logger = logging.getLogger(__name__)


def write_rng(group: h5py.Group) -> None:
    write_tensor(group, "torch", torch.get_rng_state())
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = group.create_group("cuda")
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            write_tensor(cuda, str(i), state)
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    dataset = write_array(group, "numpy_keys", np.asarray(keys, dtype=np.uint32))
    dataset.attrs.update({"algorithm": name, "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)})
    version, internal, gauss_next = random.getstate()
    dataset = write_array(group, "python_state", np.asarray(internal, dtype=np.int64))
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


def read_rng(group: h5py.Group) -> RngState:
    keys = group["numpy_keys"]
    py = group["python_state"]
    cuda = group.get("cuda")
    return RngState(
        torch_state=read_tensor(group["torch"]),
        cuda_states=[read_tensor(cuda[k]) for k in sorted(cuda, key=int)] if cuda else [],
        numpy_state=(str(keys.attrs["algorithm"]), read_array(keys), int(keys.attrs["pos"]),
                     int(keys.attrs["has_gauss"]), float(keys.attrs["cached_gaussian"])),
        python_state=(int(py.attrs["version"]), tuple(int(v) for v in read_array(py)),
                      json.loads(py.attrs["gauss_next"])),
    )
