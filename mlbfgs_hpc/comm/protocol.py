"""What the gradient reduction asks of a communicator, as a type.

:mod:`.reducer`, :mod:`.paths` and :mod:`.overlapped` call a communicator through
:class:`GradientComm` only, so they import nothing from :mod:`.communicator`, which builds
them: the imports inside the package run one way (``communicator`` → ``reducer`` →
``paths``/``overlapped`` → ``protocol``/``topology``).

:class:`~mlbfgs_hpc.comm.MPICommunicator` has every member. A
:class:`~mlbfgs_hpc.comm.LocalCommunicator` (one rank) has the first block only, which is all
a one-rank reducer touches: it returns before choosing a path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .topology import HostLayout, NodePlan


class GradientComm(Protocol):
    """The communicator members the gradient paths use."""

    # ---- every communicator ---------------------------------------------------------------
    rank: int
    size: int
    local_size: int
    layout: HostLayout

    def resolve_node_aware(self, requested: bool | None) -> bool: ...

    # ---- MPI only (more than one rank) ----------------------------------------------------
    is_host_leader: bool
    host_index: int

    def grad_backend_for(self, requested: str, *, on_gpu: bool) -> str: ...

    def horovod(self) -> Any: ...

    def horovod_host_set(self) -> Any: ...

    def horovod_leaders_set(self) -> Any: ...

    def allreduce_sum_(self, flat: torch.Tensor) -> None: ...

    def reduce_scatter_sum_(self, send: torch.Tensor, out: torch.Tensor,
                            counts: Sequence[int]) -> None: ...

    def node_plan(self, counts: Sequence[int], offsets: Sequence[int]) -> NodePlan: ...

    def node_reduce_scatter_sum_(self, packed: torch.Tensor, out: torch.Tensor,
                                 plan: NodePlan, *, host_summed: bool = False) -> None: ...

    def host_scatterv_(self, share: torch.Tensor | None, out: torch.Tensor,
                       plan: NodePlan) -> None: ...
