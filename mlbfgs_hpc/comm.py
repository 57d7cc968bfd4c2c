"""The communication layer: the only module that talks to Horovod or MPI.

Two objects cover everything the optimizer and the training driver need:

* :class:`Communicator`: rank/size, ``Allgatherv`` of the owned update slices straight into
  the flat update vector, an all-gather of the few decision scalars per step (every rank then
  reduces them in rank order itself, so all ranks hold *bitwise identical* values and take
  identical branches), parameter broadcast, barrier and job abort.
* :class:`GradientReducer`: averages ``.grad`` over ranks, either with Horovod (one
  ``allreduce_async_`` per parameter launched from a post-accumulate-grad hook, so Horovod's
  tensor fusion overlaps communication with the rest of the backward pass) or with one flat
  ``mpi4py`` ``Allreduce`` after the backward pass (for clusters without a working Horovod).

::

    rank 0 ──┐  backward: hooks ─► hvd.allreduce_async_(grad.<name>)   (Horovod thread, fused)
    rank 1 ──┤  step:     synchronize ─► own blocks ─► allgather(scalars) ─► Allgatherv(update)
    rank 2 ──┘                                          [mpi4py, COMM_WORLD]

With one process and no launcher, :func:`init_communicator` returns a
:class:`LocalCommunicator` and no MPI library is even imported (the embedded default).
Horovod gets its own duplicate of ``COMM_WORLD`` so its background thread and our mpi4py calls
never share a communicator.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch

logger = logging.getLogger(__name__)

GradBackend = Literal["horovod", "mpi"]
GRAD_BACKENDS: tuple[str, ...] = ("horovod", "mpi")

# Variables that MPI launchers (Open MPI's mpirun, PMIx/srun, MPICH/Hydra, MVAPICH) export.
# They only decide *whether* to initialise MPI; rank and size always come from MPI itself.
_LAUNCHER_MARKERS: tuple[str, ...] = (
    "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched_by_mpi() -> bool:
    """True when an MPI launcher started this process (override: ``MLBFGS_COMM=local|mpi``)."""
    forced = os.environ.get("MLBFGS_COMM", "").lower()
    if forced in ("local", "mpi"):
        return forced == "mpi"
    return any(marker in os.environ for marker in _LAUNCHER_MARKERS)


class LocalCommunicator:
    """One process, no communication: every collective is the identity."""

    rank = 0
    size = 1
    local_rank = 0
    local_size = 1
    hostname = os.uname().nodename

    def allgather_scalars(self, values: Sequence[float]) -> np.ndarray:
        return np.asarray([values], dtype=np.float64)

    def allgatherv_(self, flat: torch.Tensor, counts: Sequence[int],
                    displs: Sequence[int]) -> None:
        del flat, counts, displs  # the single rank already holds every slice

    def broadcast_tensors_(self, tensors: Iterable[torch.Tensor], root: int = 0) -> None:
        del tensors, root

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        os._exit(code)

    def gradient_reducer(self, named_params: Sequence[tuple[str, torch.Tensor]], *,
                         backend: GradBackend = "horovod") -> GradientReducer:
        return GradientReducer(comm=self, named_params=named_params, backend=backend)


class MPICommunicator(LocalCommunicator):
    """``mpi4py`` on ``COMM_WORLD``; Horovod (if used) on a duplicate of it.

    Args:
        abort_on_exception: install a ``sys.excepthook`` that logs the traceback with the
            rank and calls ``MPI_Abort``, so an exception on one rank ends the whole job
            instead of leaving the others blocked in a collective.
    """

    def __init__(self, *, abort_on_exception: bool = True) -> None:
        from mpi4py import MPI  # imported here: a plain run never loads MPI

        self._MPI = MPI
        self._comm = MPI.COMM_WORLD
        self.rank = self._comm.Get_rank()
        self.size = self._comm.Get_size()
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = local.Get_rank()
        self.local_size = local.Get_size()
        local.Free()
        self.hostname = MPI.Get_processor_name()
        self._hvd: Any = None
        if abort_on_exception:
            _install_abort_hook(self.abort, self.rank)

    # ---- Horovod ------------------------------------------------------------------------
    def horovod(self) -> Any:
        """``horovod.torch``, initialised once on a duplicate of ``COMM_WORLD``."""
        if self._hvd is None:
            try:
                import horovod.torch as hvd
            except ImportError as exc:  # pragma: no cover - depends on the installation
                raise RuntimeError(
                    "grad backend 'horovod' needs horovod.torch (run tools/bootstrap.sh, or "
                    "choose --grad-backend mpi)") from exc
            hvd.init(comm=self._comm.Dup())
            if hvd.size() != self.size or hvd.rank() != self.rank:
                raise RuntimeError(f"Horovod sees rank {hvd.rank()}/{hvd.size()}, "
                                   f"MPI sees {self.rank}/{self.size}")
            self._hvd = hvd
        return self._hvd

    # ---- collectives --------------------------------------------------------------------
    def allgather_scalars(self, values: Sequence[float]) -> np.ndarray:
        send = np.asarray(values, dtype=np.float64)
        recv = np.empty((self.size, send.size), dtype=np.float64)
        self._comm.Allgather(send, recv)
        return recv

    def allgatherv_(self, flat: torch.Tensor, counts: Sequence[int],
                    displs: Sequence[int]) -> None:
        host = flat if flat.device.type == "cpu" else flat.cpu()
        buffer = host.detach().numpy()  # shares memory with the tensor: no packing
        mpi_type = self._MPI._typedict[buffer.dtype.char]
        self._comm.Allgatherv(self._MPI.IN_PLACE,
                              [buffer, list(counts), list(displs), mpi_type])
        if host is not flat:
            flat.copy_(host)

    def allreduce_sum_(self, flat: torch.Tensor) -> None:
        host = flat if flat.device.type == "cpu" else flat.cpu()
        self._comm.Allreduce(self._MPI.IN_PLACE, host.detach().numpy(), op=self._MPI.SUM)
        if host is not flat:
            flat.copy_(host)

    def broadcast_tensors_(self, tensors: Iterable[torch.Tensor], root: int = 0) -> None:
        for tensor in tensors:
            host = tensor.detach() if tensor.device.type == "cpu" else tensor.detach().cpu()
            host = host.contiguous()
            self._comm.Bcast(host.numpy(), root=root)
            if host.data_ptr() != tensor.data_ptr():
                tensor.detach().copy_(host)

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        return self._comm.bcast(obj, root=root)

    def allgather_object(self, obj: Any) -> list[Any]:
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        self._comm.Barrier()

    def abort(self, code: int = 1) -> None:
        logging.shutdown()
        self._comm.Abort(code)


def init_communicator(*, abort_on_exception: bool = True) -> LocalCommunicator:
    """The communicator for this process: MPI under a launcher, local otherwise.

    A launcher that starts a single rank (``mpirun -np 1``) also gets the local communicator:
    with one rank every collective is the identity.
    """
    if not launched_by_mpi():
        return LocalCommunicator()
    comm = MPICommunicator(abort_on_exception=abort_on_exception)
    if comm.size == 1:
        return comm if os.environ.get("MLBFGS_COMM") == "mpi" else LocalCommunicator()
    logger.debug("rank %d/%d on %s", comm.rank, comm.size, comm.hostname)
    return comm


class GradientReducer:
    """Averages parameter gradients over all ranks.

    Args:
        comm: the communicator.
        named_params: the parameters whose ``.grad`` is averaged, with stable names (they name
            the Horovod collectives, so ranks can never pair up different tensors).
        backend: ``"horovod"`` (hook-launched, fused, overlapping the backward pass) or
            ``"mpi"`` (one flat ``mpi4py`` ``Allreduce`` in :meth:`synchronize`).

    Call :meth:`synchronize` after ``backward()`` and before reading the gradients; the
    optimizer does it in ``step()``. With one rank both are no-ops.
    """

    def __init__(self, *, comm: LocalCommunicator,
                 named_params: Sequence[tuple[str, torch.Tensor]],
                 backend: GradBackend = "horovod") -> None:
        if backend not in GRAD_BACKENDS:
            raise ValueError(f"backend must be one of {GRAD_BACKENDS}, got {backend!r}")
        names = [name for name, _ in named_params]
        if len(set(names)) != len(names):
            raise ValueError("named_params must have unique names")
        self.comm = comm
        self.backend = backend
        self.named_params = list(named_params)
        self._handles: dict[int, Any] = {}
        self._hook_handles: list[Any] = []
        self._flat: torch.Tensor | None = None
        if comm.size > 1 and backend == "horovod":
            self._hvd = comm.horovod()  # type: ignore[attr-defined]
            on_gpu = any(p.device.type == "cuda" for _, p in self.named_params)
            if on_gpu and not (self._hvd.cuda_built() or self._hvd.rocm_built()):
                # tools/bootstrap.sh builds Horovod with CPU operations only; Horovod itself
                # would fail later, inside its background thread, with a less clear message.
                raise RuntimeError(
                    "the parameters are on a GPU but this Horovod was built without GPU "
                    "operations: use --grad-backend mpi (stages gradients through host "
                    "memory) or rebuild Horovod with HOROVOD_GPU_OPERATIONS=NCCL")
            for name, param in self.named_params:
                self._hook_handles.append(
                    param.register_post_accumulate_grad_hook(self._make_hook(name)))

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            # A parameter used twice in one graph fires once per accumulation: launch once.
            if id(param) not in self._handles:
                self._handles[id(param)] = self._hvd.allreduce_async_(
                    param.grad, name=f"grad.{name}", op=self._hvd.Average)
        return hook

    def synchronize(self) -> None:
        """Block until every gradient is averaged over all ranks."""
        if self.comm.size == 1:
            return
        if self.backend == "horovod":
            for name, param in self.named_params:
                if id(param) not in self._handles:
                    # No gradient reached this parameter in this backward pass: reduce zeros
                    # so every rank takes part in the same named collectives.
                    if param.grad is None:
                        param.grad = torch.zeros_like(param)
                    self._handles[id(param)] = self._hvd.allreduce_async_(
                        param.grad, name=f"grad.{name}", op=self._hvd.Average)
            for _, param in self.named_params:
                self._hvd.synchronize(self._handles.pop(id(param)))
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                 for _, p in self.named_params]
        total = sum(g.numel() for g in grads)
        if self._flat is None or self._flat.numel() != total:
            self._flat = torch.empty(total, dtype=grads[0].dtype, device=grads[0].device)
        views = list(self._flat.split([g.numel() for g in grads]))
        torch._foreach_copy_(views, [g.reshape(-1) for g in grads])
        self.comm.allreduce_sum_(self._flat)  # type: ignore[attr-defined]
        self._flat.div_(self.comm.size)
        for (_, param), view in zip(self.named_params, views):
            if param.grad is None:
                param.grad = view.view_as(param).clone()
            else:
                param.grad.copy_(view.view_as(param))

    def remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()


def tensor_digest(tensors: Iterable[torch.Tensor]) -> int:
    """CRC32 of the tensors' bytes (used by the cross-rank consistency check)."""
    crc = 0
    for tensor in tensors:
        data = tensor.detach().contiguous().cpu()
        crc = zlib.crc32(data.view(torch.uint8).numpy().tobytes(), crc)
    return crc


def _install_abort_hook(abort: Callable[[int], None], rank: int) -> None:
    previous = sys.excepthook

    def hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        sys.stderr.write(f"[mlbfgs-hpc] rank {rank}: uncaught exception, aborting the job:\n"
                         f"{text}")
        sys.stderr.flush()
        abort(1)

    sys.excepthook = hook
