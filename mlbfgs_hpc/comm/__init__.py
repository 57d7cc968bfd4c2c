"""The communication layer: the only package that talks to Horovod or MPI.

* :class:`LocalCommunicator` / :class:`MPICommunicator` (:mod:`.communicator`): rank/size and
  the host structure (which ranks share a host, one leader per host), the ``Allgatherv`` of
  the owned update slices straight into the flat update vector (flat, or node-aware), an
  all-gather of the few decision scalars per step (every rank then reduces them in rank order
  itself, so all ranks hold *bitwise identical* values and take identical branches), parameter
  broadcast, barrier and job abort.
* :class:`GradientReducer` (:mod:`.reducer`): averages the gradients, either to every rank
  (``allreduce``) or only to the rank that owns each block (``reducescatter``: half the
  bytes), with Horovod (launched from post-accumulate-grad hooks, overlapping the backward
  pass) or with ``mpi4py``; ``backend="auto"`` (the default) takes Horovod where it imports
  on every rank, ``mpi4py`` otherwise. Its paths: :mod:`.paths` (after the backward pass,
  and Horovod's allreduce) and :mod:`.overlapped` (Horovod's reduce-scatter, one owner at a
  time from the hooks).
* :mod:`.protocol`: the communicator as the reducer and its paths see it (a type), so that
  the imports run one way: ``communicator`` → ``reducer`` → ``paths``/``overlapped`` →
  ``protocol`` → ``topology``.
* :mod:`.topology`: pure functions for the node-aware path (host-major offsets).

One mL-BFGS step, flat (one rank per host, or ``--node-aware off``)::

    rank 0 ──┐  backward: hooks ─► hvd.allreduce_async_ / alltoall to each owner (Horovod)
    rank 1 ──┤  step:     synchronize ─► own blocks ─► allgather(scalars) ─► Allgatherv(update)
    rank 2 ──┘                                          [mpi4py, COMM_WORLD]

Node-aware (chosen automatically when a host runs more than one rank), 2 hosts x 2 ranks,
ranks 0-1 own host A's run of the flat vector, ranks 2-3 host B's::

                 host A (shared memory)                    host B (shared memory)
    gradient:  r0 ─┐                                                      ┌─ r2
                   ├─ Reduce ─► leader r0 ═══ Reduce_scatter ═══ leader r2 ◄─ Reduce ─┤
               r1 ─┘            (host sum)   (by host share:   (host sum)             └─ r3
                                  │           A gets A's run,     │
                                  ▼           B gets B's run)     ▼
                          Scatterv to r0, r1               Scatterv to r2, r3
                          (each: its owned slice)          (each: its owned slice)

    update:    r0, r1 ─ Gatherv ─► r0 ═══ Allgatherv (leaders) ═══ r2 ◄─ Gatherv ─ r2, r3
                                   │                                │
                          Bcast to r0, r1                  Bcast to r2, r3

    ═══ crosses the network: each host sends once the other hosts' share of its host sum,
        and once its own share of the update: model-size bytes per host per step, whatever
        the number of ranks per host (flat: about 2x, growing with ranks per host).

    With Horovod the gradient's two first steps start during the backward pass: the host
    sum is a Horovod allreduce on the host's process set, launched per parameter from the
    hooks, and the leaders' step is one ``alltoall`` per owner among the leaders, sending
    the owner's slice to its host's leader as soon as the slice is summed over the host
    (:mod:`.overlapped`).

With one process and no launcher, :func:`init_communicator` returns a
:class:`LocalCommunicator` and no MPI library is even imported (the embedded default).
Horovod gets its own duplicate of ``COMM_WORLD`` so its background thread and our mpi4py calls
never share a communicator.
"""

from __future__ import annotations

from .communicator import (
    LauncherError,
    LocalCommunicator,
    MPICommunicator,
    init_communicator,
    launched_by_mpi,
    tensor_digest,
)
from .protocol import GradientComm
from .reducer import (
    GRAD_BACKENDS,
    GRAD_REDUCE_MODES,
    GradBackend,
    GradientReducer,
    GradReduce,
)
from .topology import HostLayout, NodePlan, node_plan

__all__ = [
    "GRAD_BACKENDS", "GRAD_REDUCE_MODES", "GradBackend", "GradReduce", "GradientComm",
    "GradientReducer",
    "HostLayout", "LauncherError", "LocalCommunicator", "MPICommunicator", "NodePlan",
    "init_communicator",
    "launched_by_mpi", "node_plan", "tensor_digest",
]
