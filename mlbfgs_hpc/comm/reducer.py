"""Gradient averaging over ranks: an allreduce to everyone, or a reduce-scatter to the owners.

:class:`GradientReducer` has two modes and two backends:

=================  =========================================================================
``allreduce``      every rank receives the whole averaged gradient in ``.grad`` (what plain
                   data parallelism and the baseline optimizers need).
                   *horovod*: one ``allreduce_async_`` per parameter, launched from its
                   post-accumulate-grad hook (fused by Horovod, overlapping the backward pass).
                   *mpi*: one flat ``Allreduce`` after the backward pass.
``reducescatter``  rank r receives only the average of its own slice of the flat gradient
                   (``owned_grad``: the blocks it owns, :mod:`mlbfgs_hpc.partition`), which is
                   all that mL-BFGS reads. Half the bytes of an allreduce.
                   *mpi*, flat: one ``Reduce_scatter`` with the ownership counts (uneven, no
                   padding). *horovod*, flat: Horovod's ``reducescatter`` of a
                   (ranks x largest slice) zero-padded matrix whose row r is rank r's slice;
                   the hooks copy each gradient into place as it arrives and the hook that
                   completes the matrix launches the collective (a reduce-scatter needs every
                   slice, so it cannot start before the backward pass ends). When the padded
                   matrix exceeds twice the model (very uneven slices: it would move more
                   bytes than an allreduce), the Horovod allreduce is used instead.
                   *node-aware* (both backends): an intra-host sum over shared memory (mpi:
                   ``Reduce`` to the host leader after the backward pass; horovod: a fused
                   ``allreduce`` on the host's process set launched from the hooks, so it
                   overlaps the backward pass), a ``Reduce_scatter`` among the host leaders
                   by host share, and a ``Scatterv`` to the owners inside the host: one copy
                   per host crosses the network.
=================  =========================================================================

The reduce-scatter sums in a fixed order for a fixed layout, so a run resumes bit for bit on
the same ranks; against one process it differs only in the order of additions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from .communicator import LocalCommunicator

if TYPE_CHECKING:  # pragma: no cover
    from ..partition import Ownership

logger = logging.getLogger(__name__)

GradBackend = Literal["horovod", "mpi"]
GRAD_BACKENDS: tuple[str, ...] = ("horovod", "mpi")
GradReduce = Literal["allreduce", "reducescatter"]
GRAD_REDUCE_MODES: tuple[str, ...] = ("allreduce", "reducescatter")


class GradientReducer:
    """Averages parameter gradients over all ranks.

    Args:
        comm: the communicator.
        named_params: the parameters whose gradients are averaged, with stable names (they
            name the Horovod collectives, so ranks can never pair up different tensors). For
            ``reducescatter`` they must be in the layout order of ``ownership``'s flat vector.
        backend: ``"horovod"`` (hook-launched, overlapping the backward pass) or ``"mpi"``
            (``mpi4py`` collectives in :meth:`synchronize`).
        mode: ``"allreduce"`` (``.grad`` averaged on every rank) or ``"reducescatter"``
            (:attr:`owned_grad`: the average of this rank's slice only).
        ownership: the slices of the flat gradient per rank; required for ``reducescatter``.
        node_aware: ``reducescatter`` only: combine inside each host first so one copy per
            host crosses the network. ``None``: when it pays (more than one host, some host
            with more than one rank).

    Call :meth:`synchronize` after ``backward()`` and before reading the gradients; the
    optimizer does it in ``step()``. With one rank both are no-ops. In ``reducescatter`` mode
    ``.grad`` is left as it was (or summed over the host): read :attr:`owned_grad`.

    Raises:
        ValueError: unknown backend or mode, repeated names, or ``reducescatter`` without an
            ownership table that covers exactly the parameters.
    """

    def __init__(self, *, comm: LocalCommunicator,
                 named_params: Sequence[tuple[str, torch.Tensor]],
                 backend: GradBackend = "horovod", mode: GradReduce = "allreduce",
                 ownership: Ownership | None = None, node_aware: bool | None = None) -> None:
        if backend not in GRAD_BACKENDS:
            raise ValueError(f"backend must be one of {GRAD_BACKENDS}, got {backend!r}")
        if mode not in GRAD_REDUCE_MODES:
            raise ValueError(f"mode must be one of {GRAD_REDUCE_MODES}, got {mode!r}")
        names = [name for name, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("named_params must have unique names")
        numel = sum(p.numel() for _, p in named_params)
        if mode == "reducescatter" and (ownership is None or ownership.total_numel != numel
                                        or ownership.world_size != comm.size):
            raise ValueError(
                "mode 'reducescatter' needs the ownership table of these parameters on this "
                f"world size ({numel} elements, {comm.size} ranks), got "
                + ("none" if ownership is None else
                   f"{ownership.total_numel} elements on {ownership.world_size} ranks"))
        self.comm = comm
        self.backend = backend
        self.mode = mode
        self.named_params = list(named_params)
        self.node_aware = mode == "reducescatter" and comm.resolve_node_aware(node_aware)
        #: After :meth:`synchronize` in ``reducescatter`` mode on more than one rank: this
        #: rank's slice of the averaged flat gradient; ``None`` otherwise.
        self.owned_grad: torch.Tensor | None = None
        self._hook_handles: list[Any] = []
        self._path: _Path | None = None
        if comm.size == 1:
            return
        params = [p for _, p in self.named_params]
        if backend == "horovod":
            hvd = comm.horovod()  # type: ignore[attr-defined]
            on_gpu = any(p.device.type == "cuda" for p in params)
            if on_gpu and not (hvd.cuda_built() or hvd.rocm_built()):
                # tools/bootstrap.sh builds Horovod with CPU operations only; Horovod itself
                # would fail later, inside its background thread, with a less clear message.
                raise RuntimeError(
                    "the parameters are on a GPU but this Horovod was built without GPU "
                    "operations: use --grad-backend mpi (stages gradients through host "
                    "memory) or rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL")
        self._path = self._choose_path(params, ownership)
        if self._path.uses_hooks:
            for index, param in enumerate(params):
                self._hook_handles.append(
                    param.register_post_accumulate_grad_hook(self._make_hook(index)))
        if comm.rank == 0:
            logger.info("gradients: %s", self.path)

    def _choose_path(self, params: list[torch.Tensor], ownership: Ownership | None) -> _Path:
        comm, names = self.comm, [f"grad.{name}" for name, _ in self.named_params]
        if self.mode == "allreduce":
            if self.backend == "horovod":
                hvd = comm.horovod()  # type: ignore[attr-defined]
                return _HorovodAllreduce(hvd, params, names, op=hvd.Average)
            return _MpiAllreduce(comm, params)
        assert ownership is not None
        if self.node_aware:
            plan = comm.node_plan(ownership.counts, ownership.offsets)  # type: ignore[attr-defined]
            base = plan.packed_offsets
            intra = None
            if self.backend == "horovod":
                host_set = comm.horovod_host_set()  # type: ignore[attr-defined]
                if host_set is not None:
                    hvd = comm.horovod()  # type: ignore[attr-defined]
                    intra = _HorovodAllreduce(hvd, params, [f"grad.host.{n}" for n, _ in
                                                            self.named_params],
                                              op=hvd.Sum, process_set=host_set)
            return _NodeReduceScatter(comm, params, ownership, base, plan=plan, intra=intra)
        if self.backend == "horovod":
            if comm.size * max(ownership.counts) > 2 * ownership.total_numel:
                hvd = comm.horovod()  # type: ignore[attr-defined]
                return _HorovodAllreduce(hvd, params, names, op=hvd.Average,
                                         why="instead of a reducescatter padded to "
                                             f"{comm.size} x {max(ownership.counts)} elements")
            return _HorovodReduceScatter(comm, params, ownership)
        return _FlatReduceScatter(comm, params, ownership, ownership.offsets)

    @property
    def path(self) -> str:
        """The path taken, e.g. ``"reducescatter node-aware (horovod intra-host)"``."""
        return "local (one rank)" if self._path is None else self._path.describe()

    def _make_hook(self, index: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            assert self._path is not None
            self._path.on_ready(index, param)
        return hook

    def synchronize(self) -> None:
        """Block until the gradients are averaged (see the class docstring for where)."""
        if self._path is None:
            return
        owned = self._path.finish()
        if owned is not None:
            self.owned_grad = owned.div_(self.comm.size)

    def remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


# ---- the paths --------------------------------------------------------------------------------
class _Path:
    """One way of reducing; ``finish`` returns this rank's summed slice (reduce-scatter) or
    ``None`` (allreduce: the average is in ``.grad``)."""

    uses_hooks = False

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

    def __init__(self, comm: LocalCommunicator, params: list[torch.Tensor]) -> None:
        self.comm, self.params = comm, params
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype,
                                device=params[0].device)
        self.views = list(self.flat.split([p.numel() for p in params]))

    def describe(self) -> str:
        return "allreduce (mpi)"

    def finish(self) -> None:
        grads = [_grad_or_zeros(p) for p in self.params]
        torch._foreach_copy_(self.views, [g.reshape(-1) for g in grads])
        self.comm.allreduce_sum_(self.flat)  # type: ignore[attr-defined]
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
        owner, offset = 0, 0
        for p in params:
            while offset >= ownership.offsets[owner] + ownership.counts[owner]:
                owner += 1  # slices are contiguous and in rank order; whole params inside
            start = base[owner] + offset - ownership.offsets[owner]
            self.views.append(self.buffer[start:start + p.numel()])
            offset += p.numel()

    def fill(self, indices: Sequence[int] | None = None) -> None:
        """Copy the gradients (all, or those at ``indices``) into place."""
        chosen = range(len(self.params)) if indices is None else indices
        torch._foreach_copy_([self.views[i] for i in chosen],
                             [_grad_or_zeros(self.params[i]).reshape(-1) for i in chosen])


class _FlatReduceScatter(_Path):
    """``Reduce_scatter`` over all ranks with the ownership counts, after the backward pass."""

    def __init__(self, comm: LocalCommunicator, params: list[torch.Tensor],
                 ownership: Ownership, base: Sequence[int]) -> None:
        self.comm, self.counts = comm, ownership.counts
        self.packed = _Packed(params, ownership, base, ownership.total_numel)
        self.out = torch.zeros(ownership.counts[comm.rank], dtype=params[0].dtype,
                               device=params[0].device)

    def describe(self) -> str:
        return "reducescatter (mpi)"

    def finish(self) -> torch.Tensor:
        self.packed.fill()
        self.comm.reduce_scatter_sum_(self.packed.buffer, self.out,  # type: ignore[attr-defined]
                                      self.counts)
        return self.out


class _NodeReduceScatter(_FlatReduceScatter):
    """Intra-host sum, ``Reduce_scatter`` among host leaders, intra-host ``Scatterv``.

    ``intra``: a Horovod host-set allreduce launched from the hooks (then the host sum is
    already in every ``.grad`` when :meth:`finish` runs); ``None``: an MPI ``Reduce``.
    """

    def __init__(self, comm: LocalCommunicator, params: list[torch.Tensor],
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
        if self.comm.is_host_leader or not host_summed:  # type: ignore[attr-defined]
            self.packed.fill()   # a non-leader's host sum is not needed by anyone
        self.comm.node_reduce_scatter_sum_(  # type: ignore[attr-defined]
            self.packed.buffer, self.out, self.plan, host_summed=host_summed)
        return self.out


class _HorovodReduceScatter(_Path):
    """Horovod ``reducescatter`` of a (ranks x largest slice) zero-padded matrix.

    Horovod splits the first dimension evenly, so with one row per rank each rank receives
    exactly its row: its slice of the sum, followed by padding it ignores. Bytes: the
    padded matrix, i.e. ``ranks * max(counts)`` elements instead of the model's.
    """

    uses_hooks = True

    def __init__(self, comm: LocalCommunicator, params: list[torch.Tensor],
                 ownership: Ownership) -> None:
        self.comm, self.params = comm, params
        self.hvd = comm.horovod()  # type: ignore[attr-defined]
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
