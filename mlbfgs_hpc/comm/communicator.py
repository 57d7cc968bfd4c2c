"""Communicators: the only code that calls MPI (mpi4py) and initialises Horovod.

* :class:`LocalCommunicator`: one process, every collective is the identity.
* :class:`MPICommunicator`: ``COMM_WORLD`` plus the node structure MPI reports
  (``Split_type(COMM_TYPE_SHARED)``): a *host* communicator per host and a *leaders*
  communicator of local rank 0 of every host. It offers the flat collectives (over all ranks)
  and the node-aware ones, which combine inside a host over shared memory first so that only
  one copy per host crosses the network (see :mod:`mlbfgs_hpc.comm` for the diagram).

Every method that takes a tensor stages a non-CPU tensor through host memory.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from .reducer import GradBackend, GradientReducer, GradReduce
from .topology import HostLayout, NodePlan, node_plan

logger = logging.getLogger(__name__)

# Variables that MPI launchers (Open MPI's mpirun, PMIx/srun, MPICH/Hydra, MVAPICH) export.
# They only decide *whether* to initialise MPI; rank and size always come from MPI itself.
_LAUNCHER_MARKERS: tuple[str, ...] = (
    "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


class LauncherError(RuntimeError):
    """Several processes were started without MPI (``horovodrun`` on Gloo): each would train
    alone."""


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
    layout = HostLayout((0,))

    def resolve_node_aware(self, requested: bool | None) -> bool:
        """Whether the node-aware collectives are used: ``requested`` (``None``: when they
        pay, i.e. more than one host and some host with more than one rank). Always
        ``False`` with one process."""
        if self.size == 1:
            return False
        return self.layout.node_aware_pays if requested is None else bool(requested)

    def allgather_scalars(self, values: Sequence[float]) -> np.ndarray:
        return np.asarray([values], dtype=np.float64)

    def allgatherv_(self, flat: torch.Tensor, counts: Sequence[int],
                    displs: Sequence[int], *, node_aware: bool = False) -> None:
        del flat, counts, displs, node_aware  # the single rank already holds every slice

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

    def grad_backend_for(self, requested: str, *, on_gpu: bool) -> str:
        """The gradient backend ``requested`` stands for (one rank: reduces nothing, so it
        is returned as it is)."""
        del on_gpu
        return requested

    def gradient_reducer(self, named_params: Sequence[tuple[str, torch.Tensor]], *,
                         backend: GradBackend = "auto", mode: GradReduce = "allreduce",
                         **kwargs: Any) -> GradientReducer:
        """A :class:`~mlbfgs_hpc.comm.GradientReducer` on this communicator."""
        return GradientReducer(comm=self, named_params=named_params, backend=backend,
                               mode=mode, **kwargs)


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
        # Ranks of one host (key=rank: local rank order = world rank order) and one leader
        # (local rank 0) per host; hosts are numbered by their leader's rank in `_leaders`.
        self._host = self._comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self._host.Get_rank()
        self.local_size = self._host.Get_size()
        self.is_host_leader = self.local_rank == 0
        self._leaders = self._comm.Split(0 if self.is_host_leader else MPI.UNDEFINED,
                                         key=self.rank)
        host_index = self._leaders.Get_rank() if self.is_host_leader else -1
        self.host_index = self._host.bcast(host_index, root=0)
        self.layout = HostLayout(tuple(self._comm.allgather(self.host_index)))
        self.hostname = MPI.Get_processor_name()
        self._hvd: Any = None
        self._auto_backend: dict[bool, str] = {}
        self._hvd_host_set: Any = None
        self._hvd_leaders_set: Any = None
        self._plans: dict[tuple[tuple[int, ...], tuple[int, ...]], NodePlan] = {}
        self._packed: np.ndarray | None = None
        if abort_on_exception:
            _install_abort_hook(self.abort, self.rank)

    # ---- Horovod ------------------------------------------------------------------------
    def grad_backend_for(self, requested: str, *, on_gpu: bool) -> str:
        """The gradient backend ``requested`` stands for: ``"auto"`` is ``"horovod"`` when
        ``horovod.torch`` imports on every rank (built with GPU operations, if ``on_gpu``),
        ``"mpi"`` otherwise.

        Collective for ``"auto"`` the first time (per ``on_gpu``): every rank must take the
        same backend, or their collectives would never pair up. Rank 0 logs the choice once.
        """
        if requested != "auto":
            return requested
        if on_gpu not in self._auto_backend:
            problems = self._comm.allgather(_horovod_problem(on_gpu=on_gpu))
            failed = [(rank, why) for rank, why in enumerate(problems) if why]
            choice = "mpi" if failed else "horovod"
            if self.rank == 0:
                if failed:
                    logger.info("gradient backend auto: mpi (Horovod is not usable on %d of "
                                "%d ranks; rank %d: %s)", len(failed), self.size, *failed[0])
                else:
                    logger.info("gradient backend auto: horovod")
            self._auto_backend[on_gpu] = choice
        return self._auto_backend[on_gpu]

    def horovod(self) -> Any:
        """``horovod.torch``, initialised once on a duplicate of ``COMM_WORLD``.

        When some host runs more than one rank, every host's ranks are also registered as a
        Horovod process set (:meth:`horovod_host_set`), for the node-aware gradient path.
        """
        if self._hvd is None:
            try:
                import horovod.torch as hvd
            except ImportError as exc:  # pragma: no cover - depends on the installation
                raise RuntimeError(
                    "grad backend 'horovod' needs horovod.torch (install Horovod, or choose "
                    "--grad-backend auto or mpi)") from exc
            layout = self.layout
            sets = None
            if layout.node_aware_pays:
                # One set per host, then the hosts' leaders (local rank 0 of every host).
                sets = [hvd.ProcessSet(list(layout.ranks_of(h))) for h in range(layout.hosts)]
                sets.append(hvd.ProcessSet([layout.ranks_of(h)[0]
                                            for h in range(layout.hosts)]))
            hvd.init(comm=self._comm.Dup(), process_sets=sets)
            if hvd.size() != self.size or hvd.rank() != self.rank:
                raise RuntimeError(f"Horovod sees rank {hvd.rank()}/{hvd.size()}, "
                                   f"MPI sees {self.rank}/{self.size}")
            self._hvd = hvd
            self._hvd_host_set = (sets[self.host_index] if sets is not None
                                  else hvd.global_process_set if layout.hosts == 1 else None)
            self._hvd_leaders_set = sets[-1] if sets is not None else None
        return self._hvd

    def horovod_host_set(self) -> Any:
        """The Horovod process set of this rank's host (``None`` with one rank per host)."""
        self.horovod()
        return self._hvd_host_set

    def horovod_leaders_set(self) -> Any:
        """The Horovod process set of the hosts' leaders, rank h of it leading host h
        (``None`` unless :attr:`layout` ``.node_aware_pays``: one host, or one rank per host)."""
        self.horovod()
        return self._hvd_leaders_set

    # ---- flat collectives (all ranks) ---------------------------------------------------
    def allgather_scalars(self, values: Sequence[float]) -> np.ndarray:
        send = np.asarray(values, dtype=np.float64)
        recv = np.empty((self.size, send.size), dtype=np.float64)
        self._comm.Allgather(send, recv)
        return recv

    def allgatherv_(self, flat: torch.Tensor, counts: Sequence[int],
                    displs: Sequence[int], *, node_aware: bool = False) -> None:
        """Assemble ``flat`` from every rank's slice ``[displs[r], displs[r] + counts[r])``.

        Args:
            node_aware: gather inside each host, exchange one copy per host among the
                leaders, broadcast inside the host. Moves the same bytes into ``flat``
                (the result is bit for bit the flat ``Allgatherv``'s).
        """
        with _on_host(flat) as buffer:
            if node_aware:
                self._allgatherv_node(buffer, counts, displs)
            else:
                self._comm.Allgatherv(self._MPI.IN_PLACE,
                                      [buffer, list(counts), list(displs), self._type(buffer)])

    def allreduce_sum_(self, flat: torch.Tensor) -> None:
        with _on_host(flat) as buffer:
            self._comm.Allreduce(self._MPI.IN_PLACE, buffer, op=self._MPI.SUM)

    def reduce_scatter_sum_(self, send: torch.Tensor, out: torch.Tensor,
                            counts: Sequence[int]) -> None:
        """``out`` ← rank's part (``counts[rank]`` elements, parts in rank order) of the sum
        of ``send`` over all ranks: one ``MPI_Reduce_scatter`` with uneven counts."""
        with _on_host(send) as sbuf, _on_host(out) as rbuf:
            self._comm.Reduce_scatter([sbuf, self._type(sbuf)], [rbuf, self._type(rbuf)],
                                      recvcounts=list(counts), op=self._MPI.SUM)

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

    # ---- node-aware collectives ---------------------------------------------------------
    def node_plan(self, counts: Sequence[int], offsets: Sequence[int]) -> NodePlan:
        """The host-major plan of these rank slices (cached; see :mod:`.topology`)."""
        key = (tuple(counts), tuple(offsets))
        if key not in self._plans:
            self._plans[key] = node_plan(self.layout, counts=counts, offsets=offsets)
        return self._plans[key]

    def node_reduce_scatter_sum_(self, packed: torch.Tensor, out: torch.Tensor,
                                 plan: NodePlan, *, host_summed: bool = False) -> None:
        """``out`` ← this rank's slice of the sum of ``packed`` over all ranks, moving one
        copy per host across the network.

        1. intra-host ``Reduce`` to the host leader (shared memory), skipped when
           ``host_summed`` (the caller already summed over the host, e.g. with Horovod);
        2. ``Reduce_scatter`` among the leaders, each host receiving its run of the
           host-major vector (``plan.host_counts``);
        3. intra-host ``Scatterv`` of that run to its owners.

        Args:
            packed: this rank's full-length vector in host-major order (overwritten on the
                leader: it becomes the host sum).
            out: this rank's slice, ``plan.counts[rank]`` elements.
        """
        MPI = self._MPI
        h = self.host_index
        with _on_host(packed) as sbuf, _on_host(out) as rbuf:
            mpi_type = self._type(sbuf)
            if not host_summed and self.local_size > 1:
                if self.is_host_leader:
                    self._host.Reduce(MPI.IN_PLACE, [sbuf, mpi_type], op=MPI.SUM, root=0)
                else:
                    self._host.Reduce([sbuf, mpi_type], None, op=MPI.SUM, root=0)
            if not self.is_host_leader:
                self._scatter_host_run(None, rbuf, plan)
                return
            share = self._scratch(plan.host_counts[h], sbuf.dtype)
            self._leaders.Reduce_scatter([sbuf, mpi_type], [share, mpi_type],
                                         recvcounts=list(plan.host_counts), op=MPI.SUM)
            self._scatter_host_run(share, rbuf, plan)

    def host_scatterv_(self, share: torch.Tensor | None, out: torch.Tensor,
                       plan: NodePlan) -> None:
        """``out`` ← this rank's slice of its host's run, sent by the host leader, which
        holds the run in ``share`` (host-major, ``plan.host_counts[host]`` elements, empty
        when the host owns nothing; ``None`` on the other ranks)."""
        with _on_host(out) as rbuf:
            if share is None:
                self._scatter_host_run(None, rbuf, plan)
                return
            with _on_host(share) as sbuf:
                self._scatter_host_run(sbuf, rbuf, plan)

    def _scatter_host_run(self, share: np.ndarray | None, rbuf: np.ndarray,
                          plan: NodePlan) -> None:
        mpi_type = self._type(rbuf)
        if share is None:  # not the leader: receive only
            self._host.Scatterv(None, [rbuf, mpi_type], root=0)
            return
        h = self.host_index
        self._host.Scatterv([share, plan.local_counts(h), plan.local_displs(h), mpi_type],
                            [rbuf, mpi_type], root=0)

    def _allgatherv_node(self, buffer: np.ndarray, counts: Sequence[int],
                         displs: Sequence[int]) -> None:
        MPI = self._MPI
        plan = self.node_plan(counts, displs)
        h = self.host_index
        mpi_type = self._type(buffer)
        mine = buffer[displs[self.rank]:displs[self.rank] + counts[self.rank]]
        if not self.is_host_leader:
            self._host.Gatherv([mine, mpi_type], None, root=0)
            self._host.Bcast([buffer, mpi_type], root=0)
            return
        work = buffer if plan.identity else self._scratch(buffer.size, buffer.dtype)
        base, run = plan.host_offsets[h], plan.host_counts[h]
        if not plan.identity:
            start = plan.packed_offsets[self.rank]
            work[start:start + counts[self.rank]] = mine
        self._host.Gatherv(MPI.IN_PLACE, [work[base:base + run], plan.local_counts(h),
                                          plan.local_displs(h), mpi_type], root=0)
        self._leaders.Allgatherv(MPI.IN_PLACE, [work, list(plan.host_counts),
                                                list(plan.host_offsets), mpi_type])
        for natural, packed, count in plan.moves():
            buffer[natural:natural + count] = work[packed:packed + count]
        self._host.Bcast([buffer, mpi_type], root=0)

    # ---- helpers ------------------------------------------------------------------------
    def _type(self, buffer: np.ndarray) -> Any:
        return self._MPI._typedict[buffer.dtype.char]

    def _scratch(self, numel: int, dtype: np.dtype) -> np.ndarray:
        """A reused host buffer of at least ``numel`` elements of ``dtype`` (a view)."""
        nbytes = numel * np.dtype(dtype).itemsize
        if self._packed is None or self._packed.nbytes < nbytes:
            self._packed = np.empty(max(nbytes, 1), dtype=np.uint8)
        return self._packed[:nbytes].view(dtype)


class _on_host:  # noqa: N801 - used as a context manager, reads like a function
    """``with _on_host(tensor) as array``: a numpy view of ``tensor`` (a host copy for a
    device tensor, copied back on exit)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.host = tensor.detach() if tensor.device.type == "cpu" else tensor.detach().cpu()

    def __enter__(self) -> np.ndarray:
        return self.host.numpy()  # shares memory with the tensor: no packing

    def __exit__(self, *exc: object) -> None:
        if self.host.data_ptr() != self.tensor.data_ptr():
            self.tensor.detach().copy_(self.host)


def init_communicator(*, abort_on_exception: bool = True) -> LocalCommunicator:
    """The communicator for this process: MPI under a launcher, local otherwise.

    Raises:
        LauncherError: ``horovodrun`` started several processes without MPI (Gloo).

    A launcher that starts a single rank (``mpirun -np 1``) also gets the local communicator:
    with one rank every collective is the identity.
    """
    if not launched_by_mpi():
        gloo_size = os.environ.get("HOROVOD_SIZE", "1")
        if os.environ.get("MLBFGS_COMM", "").lower() != "local" and gloo_size not in ("", "1"):
            # horovodrun without MPI (a Horovod built with Gloo only, or --gloo) exports
            # HOROVOD_SIZE but no MPI variable: MPI would not start, and every process would
            # train alone as rank 0 of 1. Refuse instead of running N unrelated trainings.
            raise LauncherError(
                f"started by horovodrun with Gloo ({gloo_size} processes, no MPI launcher): "
                "mlbfgs-hpc's collectives need MPI; use `horovodrun --mpi`, mpirun or srun")
        return LocalCommunicator()
    comm = MPICommunicator(abort_on_exception=abort_on_exception)
    if comm.size == 1:
        return comm if os.environ.get("MLBFGS_COMM") == "mpi" else LocalCommunicator()
    logger.debug("rank %d/%d on %s (host %d of %d, local rank %d of %d)", comm.rank,
                 comm.size, comm.hostname, comm.host_index, comm.layout.hosts,
                 comm.local_rank, comm.local_size)
    return comm


def _horovod_problem(*, on_gpu: bool) -> str | None:
    """Why Horovod cannot average these gradients here (``None``: it can)."""
    try:
        import horovod.torch as hvd
    except Exception as exc:  # noqa: BLE001 - any failure to import means "not usable"
        return f"horovod.torch does not import ({type(exc).__name__}: {exc})"
    if on_gpu and not (hvd.cuda_built() or hvd.rocm_built()):
        return "this Horovod was built without GPU operations"
    return None


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
