"""The gradient paths that reduce after (or, Horovod's allreduce, during) the backward pass.

Each path is one way of averaging: :class:`GradientReducer` (:mod:`.reducer`) picks one and
calls :meth:`_Path.on_ready` from the parameters' post-accumulate-grad hooks (paths with
``uses_hooks``) and :meth:`_Path.finish` in ``synchronize()``. The reduce-scatter paths that
start from the hooks, per owner, live in :mod:`.overlapped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .protocol import GradientComm

if TYPE_CHECKING:  # pragma: no cover
    from ..partition import Ownership


class _Path:
    """One way of reducing; ``finish`` returns this rank's summed slice (reduce-scatter) or
    ``None`` (allreduce: the average is in ``.grad``)."""

    uses_hooks = False
    #: Paths that send per owner: how many owners' slices the last ``finish`` found already
    #: launched from the backward hooks; ``None`` on the other paths.
    last_sent_in_hooks: int | None = None

    def describe(self) -> str:
        return type(self).__name__

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        """A gradient is complete (called from its post-accumulate-grad hook)."""

    def finish(self) -> torch.Tensor | None:
        raise NotImplementedError


def _grad_or_zeros(param: torch.Tensor) -> torch.Tensor:
    # No gradient reached this parameter in this backward pass: it contributes zeros, so
    # every rank takes part in the same collectives.
    if param.grad is None:
        param.grad = torch.zeros_like(param)
    return param.grad


class _HorovodAllreduce(_Path):
    """One named ``allreduce_async_`` per parameter from its hook, in place on ``.grad``."""

    uses_hooks = True

    def __init__(self, hvd: Any, params: list[torch.Tensor], names: list[str], *, op: Any,
                 process_set: Any = None, why: str = "") -> None:
        self.hvd, self.params, self.names, self.op = hvd, params, names, op
        self.kwargs = {} if process_set is None else {"process_set": process_set}
        self.handles: dict[int, Any] = {}
        self.why = why

    def describe(self) -> str:
        return " ".join(["allreduce (horovod)", self.why]).strip()

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        # A parameter whose gradient is accumulated twice before a step launches once.
        if index not in self.handles:
            self.handles[index] = self.hvd.allreduce_async_(
                param.grad, name=self.names[index], op=self.op, **self.kwargs)

    def finish(self) -> None:
        for index, param in enumerate(self.params):
            if index not in self.handles:
                _grad_or_zeros(param)
                self.on_ready(index, param)
        for index in range(len(self.params)):
            self.hvd.synchronize(self.handles.pop(index))
        return None


class _MpiAllreduce(_Path):
    """One flat ``Allreduce`` (sum) after the backward pass, divided by the world size."""

    def __init__(self, comm: GradientComm, params: list[torch.Tensor]) -> None:
        self.comm, self.params = comm, params
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                device=params[0].device)
        self.views = list(self.flat.split([p.numel() for p in params]))

    def describe(self) -> str:
        return "allreduce (mpi)"

    def finish(self) -> None:
        grads = [_grad_or_zeros(p) for p in self.params]
        torch._foreach_copy_(self.views, [g.reshape(-1) for g in grads])
        self.comm.allreduce_sum_(self.flat)
        self.flat.div_(self.comm.size)
        torch._foreach_copy_([g.view(-1) for g in grads], self.views)
        return None


class _Packed:
    """A buffer that holds every gradient at the position its owner's slice starts at
    ``base[owner]`` (natural: ``ownership.offsets``; host-major; padded rows)."""

    def __init__(self, params: list[torch.Tensor], ownership: Ownership,
                 base: Sequence[int], numel: int) -> None:
        self.params = params
        self.buffer = torch.zeros(numel, dtype=params[0].dtype, device=params[0].device)
        self.views: list[torch.Tensor] = []
        #: Per parameter, the rank that owns it.
        self.owners: list[int] = []
        owner, offset = 0, 0
        for p in params:
            while offset >= ownership.offsets[owner] + ownership.counts[owner]:
                owner += 1  # slices are contiguous and in rank order; whole params inside
            start = base[owner] + offset - ownership.offsets[owner]
            self.views.append(self.buffer[start:start + p.numel()])
            self.owners.append(owner)
            offset += p.numel()

    def fill(self, indices: Sequence[int] | None = None) -> None:
        """Copy the gradients (all, or those at ``indices``) into place."""
        chosen = range(len(self.params)) if indices is None else indices
        torch._foreach_copy_([self.views[i] for i in chosen],
                             [_grad_or_zeros(self.params[i]).reshape(-1) for i in chosen])


class _FlatReduceScatter(_Path):
    """``Reduce_scatter`` over all ranks with the ownership counts, after the backward pass."""

    def __init__(self, comm: GradientComm, params: list[torch.Tensor],
                 ownership: Ownership, base: Sequence[int]) -> None:
        self.comm, self.counts = comm, ownership.counts
        self.packed = _Packed(params, ownership, base, ownership.total_numel)
        self.out = torch.zeros(ownership.counts[comm.rank], dtype=params[0].dtype,
                               device=params[0].device)

    def describe(self) -> str:
        return "reducescatter (mpi)"

    def finish(self) -> torch.Tensor:
        self.packed.fill()
        self.comm.reduce_scatter_sum_(self.packed.buffer, self.out,
                                      self.counts)
        return self.out


class _NodeReduceScatter(_FlatReduceScatter):
    """Intra-host sum, ``Reduce_scatter`` among host leaders, intra-host ``Scatterv``.

    ``intra``: a Horovod host-set allreduce launched from the hooks (then the host sum is
    already in every ``.grad`` when :meth:`finish` runs); ``None``: an MPI ``Reduce``.
    """

    def __init__(self, comm: GradientComm, params: list[torch.Tensor],
                 ownership: Ownership, base: Sequence[int], *, plan: Any,
                 intra: _HorovodAllreduce | None) -> None:
        super().__init__(comm, params, ownership, base)
        self.plan, self.intra = plan, intra
        self.uses_hooks = intra is not None

    def describe(self) -> str:
        intra = "horovod host allreduce" if self.intra is not None else "mpi"
        return f"reducescatter node-aware ({intra}, host-major packing: {not self.plan.identity})"

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        if self.intra is not None:
            self.intra.on_ready(index, param)

    def finish(self) -> torch.Tensor:
        if self.intra is not None:
            self.intra.finish()
        host_summed = self.intra is not None or self.comm.local_size == 1
        if self.comm.is_host_leader or not host_summed:
            self.packed.fill()   # a non-leader's host sum is not needed by anyone
        self.comm.node_reduce_scatter_sum_(
            self.packed.buffer, self.out, self.plan, host_summed=host_summed)
        return self.out


class _HorovodReduceScatter(_Path):
    """Horovod ``reducescatter`` of a (ranks x largest slice) zero-padded matrix.

    Horovod splits the first dimension evenly, so with one row per rank each rank receives
    exactly its row: its slice of the sum, followed by padding it ignores. Bytes: the
    padded matrix, i.e. ``ranks * max(counts)`` elements instead of the model's.
    """

    uses_hooks = True

    def __init__(self, comm: GradientComm, params: list[torch.Tensor],
                 ownership: Ownership) -> None:
        self.comm, self.params = comm, params
        self.hvd = comm.horovod()
        self.width = max(ownership.counts)
        rows = [r * self.width for r in range(comm.size)]
        self.packed = _Packed(params, ownership, rows, comm.size * self.width)
        self.count = ownership.counts[comm.rank]
        self.ready: set[int] = set()
        self.handle: Any = None

    def describe(self) -> str:
        return f"reducescatter (horovod, padded to {self.comm.size} x {self.width})"

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        self.packed.fill([index])
        self.ready.add(index)
        if len(self.ready) == len(self.params) and self.handle is None:
            self.handle = self.hvd.reducescatter_async(
                self.packed.buffer.view(self.comm.size, self.width),
                name="grad.reducescatter", op=self.hvd.Sum)

    def finish(self) -> torch.Tensor:
        for index, param in enumerate(self.params):
            if index not in self.ready:
                _grad_or_zeros(param)
                self.on_ready(index, param)
        out = self.hvd.synchronize(self.handle)
        self.handle = None
        self.ready.clear()
        return out.view(-1)[:self.count]
