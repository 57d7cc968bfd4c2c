"""Helpers shared by the checkpoint tests: the ``mlbfgs-ckpt`` entry point and a stand-in
for any object with ``state_dict``/``load_state_dict`` (it rides in the scheduler slot)."""

from __future__ import annotations

from typing import Any

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
