"""Helpers shared by the checkpoint tests: the ``mlbfgs-ckpt`` entry point, a stand-in for
any object with ``state_dict``/``load_state_dict`` (it rides in the scheduler slot) and a way
to damage a dataset's stored bytes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py

from tests.mpi_helpers import REPO, load_module

TOOL = REPO / "tools" / "mlbfgs_ckpt.py"

try:  # installed as a package by setup.cfg; fall back to the source tree
    from mlbfgs_hpc_tools.mlbfgs_ckpt import main as tool_main
except ImportError:
    tool_main = load_module("mlbfgs_ckpt", TOOL).main


class Stateful:
    """Holds any state; ``save_checkpoint(scheduler=Stateful(state))`` stores it as is."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:
        self.state = state


def flip_byte_in_dataset(file: Path, dataset: str) -> None:
    """Flip one byte inside the stored data of ``dataset`` (not in HDF5 metadata)."""
    with h5py.File(file, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    with file.open("r+b") as fh:
        fh.seek(offset + 3)
        byte = fh.read(1)
        fh.seek(offset + 3)
        fh.write(bytes([byte[0] ^ 0xFF]))
