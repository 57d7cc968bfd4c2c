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
                   padding), after the backward pass. *horovod*, flat: per owner, one
                   ``alltoall`` that sends the owner's slice to it alone, launched from the
                   hook that completes the slice, so it overlaps the rest of the backward
                   pass (:mod:`.overlapped`); the owner adds the copies in rank order.
                   *node-aware*: an intra-host sum over shared memory, a reduction among the
                   host leaders by host share, and a ``Scatterv`` to the owners inside the
                   host: one copy per host crosses the network. *horovod*: a fused
                   ``allreduce`` on the host's process set from the hooks; each owner's
                   slice, once summed over the host, goes to its host's leader by an
                   ``alltoall`` among the leaders, launched from a later hook
                   (:mod:`.overlapped`). *mpi*:
                   ``Reduce`` to the host leader, leaders' ``Reduce_scatter``, both after the
                   backward pass.
                   ``overlap=False`` keeps Horovod's reduce-scatter after the backward pass
                   (the path before the overlap; for measurements): flat, Horovod's
                   ``reducescatter`` of a (ranks x largest slice) zero-padded matrix (the
                   Horovod allreduce instead when that matrix exceeds twice the model);
                   node-aware, the leaders' ``Reduce_scatter`` of the *mpi* path.
=================  =========================================================================

The reduce-scatter sums in a fixed order for a fixed layout, so a run resumes bit for bit on
the same ranks; against one process it differs only in the order of additions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from .overlapped import _HorovodNodeOwnerReduce, _HorovodOwnerReduce
from .paths import (
    _FlatReduceScatter,
    _HorovodAllreduce,
    _HorovodReduceScatter,
    _MpiAllreduce,
    _NodeReduceScatter,
    _Path,
)
from .protocol import GradientComm

if TYPE_CHECKING:  # pragma: no cover
    from ..partition import Ownership

logger = logging.getLogger(__name__)

GradBackend = Literal["auto", "horovod", "mpi"]
#: ``auto`` (the default): Horovod where it imports on every rank (and, for parameters on a
#: GPU, was built with GPU operations), ``mpi`` otherwise.
GRAD_BACKENDS: tuple[str, ...] = ("auto", "horovod", "mpi")
GradReduce = Literal["allreduce", "reducescatter"]
GRAD_REDUCE_MODES: tuple[str, ...] = ("allreduce", "reducescatter")


class GradientReducer:
    """Averages parameter gradients over all ranks.

    Args:
        comm: the communicator.
        named_params: the parameters whose gradients are averaged, with stable names (they
            name the Horovod collectives, so ranks can never pair up different tensors). For
            ``reducescatter`` they must be in the layout order of ``ownership``'s flat vector.
        backend: ``"horovod"`` (hook-launched, overlapping the backward pass), ``"mpi"``
            (``mpi4py`` collectives in :meth:`synchronize`) or ``"auto"`` (the default):
            Horovod where ``horovod.torch`` imports on every rank (and has GPU operations,
            for parameters on a GPU), ``mpi`` otherwise; the choice is logged once, by rank 0.
            :attr:`backend` is the backend taken (``"auto"`` stays on one rank, which
            reduces nothing).
        mode: ``"allreduce"`` (``.grad`` averaged on every rank) or ``"reducescatter"``
            (:attr:`owned_grad`: the average of this rank's slice only).
        ownership: the slices of the flat gradient per rank; required for ``reducescatter``.
        node_aware: ``reducescatter`` only: combine inside each host first so one copy per
            host crosses the network. ``None``: when it pays (more than one host, some host
            with more than one rank).
        overlap: ``reducescatter`` with Horovod only: send each owner's slice from the hook
            that completes it, overlapping the backward pass (default), or reduce-scatter
            the whole gradient after the backward pass (``False``; kept to measure the
            overlap against). Node-aware on a single host (a test layout) always takes the
            path after the backward pass.

    Call :meth:`synchronize` after ``backward()`` and before reading the gradients; the
    optimizer does it in ``step()``. With one rank both are no-ops. In ``reducescatter`` mode
    ``.grad`` is left as it was (or summed over the host): read :attr:`owned_grad`.

    Raises:
        ValueError: unknown backend or mode, repeated names, or ``reducescatter`` without an
            ownership table that covers exactly the parameters.
    """

    def __init__(self, *, comm: GradientComm,
                 named_params: Sequence[tuple[str, torch.Tensor]],
                 backend: GradBackend = "auto", mode: GradReduce = "allreduce",
                 ownership: Ownership | None = None, node_aware: bool | None = None,
                 overlap: bool = True) -> None:
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
        self.backend: str = backend
        self.mode = mode
        self.named_params = list(named_params)
        self.node_aware = mode == "reducescatter" and comm.resolve_node_aware(node_aware)
        self.overlap = overlap
        #: After :meth:`synchronize` in ``reducescatter`` mode on more than one rank: this
        #: rank's slice of the averaged flat gradient; ``None`` otherwise.
        self.owned_grad: torch.Tensor | None = None
        self._hook_handles: dict[int, Any] = {}
        self._hooks_removed = False
        self._path: _Path | None = None
        if comm.size == 1:
            return
        params = [p for _, p in self.named_params]
        on_gpu = any(p.device.type == "cuda" for p in params)
        self.backend = backend = comm.grad_backend_for(backend, on_gpu=on_gpu)
        if backend == "horovod":
            hvd = comm.horovod()
            if on_gpu and not (hvd.cuda_built() or hvd.rocm_built()):
                # tools/bootstrap.sh builds Horovod with CPU operations only; Horovod itself
                # would fail later, inside its background thread, with a less clear message.
                raise RuntimeError(
                    "the parameters are on a GPU but this Horovod was built without GPU "
                    "operations: use --grad-backend mpi (stages gradients through host "
                    "memory) or rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL")
        self._path = self._choose_path(params, ownership)
        self.attach_hooks()
        if comm.rank == 0:
            logger.info("gradients: %s", self.path)

    def _choose_path(self, params: list[torch.Tensor], ownership: Ownership | None) -> _Path:
        comm, names = self.comm, [f"grad.{name}" for name, _ in self.named_params]
        if self.mode == "allreduce":
            if self.backend == "horovod":
                hvd = comm.horovod()
                return _HorovodAllreduce(hvd, params, names, op=hvd.Average)
            return _MpiAllreduce(comm, params)
        assert ownership is not None
        if self.node_aware:
            plan = comm.node_plan(ownership.counts, ownership.offsets)
            intra = None
            if self.backend == "horovod":
                host_set = comm.horovod_host_set()
                if host_set is not None:
                    hvd = comm.horovod()
                    intra = _HorovodAllreduce(hvd, params, [f"grad.host.{n}" for n, _ in
                                                            self.named_params],
                                              op=hvd.Sum, process_set=host_set)
                    leaders = comm.horovod_leaders_set()
                    if self.overlap and leaders is not None:
                        return _HorovodNodeOwnerReduce(comm, params, ownership, plan=plan,
                                                       intra=intra)
            return _NodeReduceScatter(comm, params, ownership, plan.packed_offsets, plan=plan,
                                      intra=intra)
        if self.backend == "horovod":
            if self.overlap:
                return _HorovodOwnerReduce(comm, params, ownership)
            if comm.size * max(ownership.counts) > 2 * ownership.total_numel:
                hvd = comm.horovod()
                return _HorovodAllreduce(hvd, params, names, op=hvd.Average,
                                         why="instead of a reducescatter padded to "
                                             f"{comm.size} x {max(ownership.counts)} elements")
            return _HorovodReduceScatter(comm, params, ownership)
        return _FlatReduceScatter(comm, params, ownership, ownership.offsets)

    @property
    def path(self) -> str:
        """The path taken, e.g. ``"reducescatter node-aware (horovod intra-host)"``."""
        return "local (one rank)" if self._path is None else self._path.describe()

    @property
    def runs_sent_during_backward(self) -> int | None:
        """How many owners' slices (node-aware: counted on a host leader) the last
        ``synchronize`` had seen sent from the backward hooks, i.e. overlapping the backward
        pass; ``None`` on the paths that do not send per owner. A diagnostic for benchmarks:
        with a short backward pass (a small model) everything may be sent at the end."""
        return None if self._path is None else self._path.last_sent_in_hooks

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
        self.attach_hooks()   # parameters unfrozen since: launched from the hooks next time

    def attach_hooks(self) -> None:
        """Launch from the backward hooks (paths that do) for every parameter that requires
        a gradient and has no hook yet: torch refuses a hook on a frozen parameter, so one
        unfrozen later gets its hook here (until then, :meth:`synchronize` sends it)."""
        if self._path is None or not self._path.uses_hooks or self._hooks_removed:
            return
        for index, (_, param) in enumerate(self.named_params):
            if param.requires_grad and index not in self._hook_handles:
                self._hook_handles[index] = param.register_post_accumulate_grad_hook(
                    self._make_hook(index))

    def remove_hooks(self) -> None:
        """Remove the backward hooks for good (:meth:`synchronize` still sends everything)."""
        self._hooks_removed = True
        for handle in self._hook_handles.values():
            handle.remove()
        self._hook_handles.clear()
