"""Reduce-scatter paths that start during the backward pass: one reduction per owner.

A reduce-scatter needs every slice of the gradient before it can start, so launched as one
collective it cannot overlap the backward pass. Split per owner it can: ownership gives each
rank (or host) one contiguous run of the flat gradient, and the backward pass completes the
runs one after another, the last layers (owned by the last ranks) first. As soon as every
gradient of a run is ready, these paths send that run to its owner, from the
post-accumulate-grad hook that completed it, while the backward pass goes on::

    backward:  layer L ......... layer k ............. layer 1 |  step()
    hooks:     run of r3 done ─► alltoall to r3                 |  synchronize: each owner
                        run of r2 done ─► alltoall to r2        |  adds the copies of its
                                     ...   run of r0 done ─► …  |  run, in rank order

Horovod has no ``reduce``; the reduction to one owner is Horovod's ``alltoall`` with splits
that send the whole run to the owner and nothing to anyone else, and the owner adds the
copies it received in rank order (bitwise reproducible for a fixed layout). Each rank sends
``n − n_own`` elements per step, what a reduce-scatter sends. Horovod's background thread
moves the data while the backward pass runs, and its negotiation pairs the ranks' launches by
name, whatever order each rank reaches them in.

Node-aware (more than one host, some host with several ranks): the intra-host Horovod
allreduce over the host's process set is launched per parameter from the hooks, as in the
path after the backward pass. The host leader polls those allreduces from later hooks; once an
owner's slice is summed over the leader's own host, it sends the slice to the owner's host
leader with an ``alltoall`` among the leaders (one copy per host crosses the network). Per
owner rank rather than per host, so that only the first rank's slice waits for the end of the
backward pass. ``synchronize`` adds the leaders' copies and scatters the host's run to its
owners over shared memory (``Scatterv``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .protocol import GradientComm
from .paths import _grad_or_zeros, _HorovodAllreduce, _Packed, _Path

if TYPE_CHECKING:  # pragma: no cover
    from ..partition import Ownership
    from .topology import NodePlan


class _RunsToOwners:
    """Each rank's slice of a packed gradient, sent to its root with a Horovod ``alltoall``.

    Args:
        hvd: ``horovod.torch``.
        params: the parameters, in layout order.
        ownership: which rank owns which slice.
        base: per rank, where its slice starts in the packed buffer.
        root_of_rank: per rank, the rank *of the process set* that receives its slice (the
            owner itself; node-aware: its host's leader).
        my_set_rank: this process's rank in the process set.
        process_set: the Horovod process set of the senders and roots.
        set_size: its number of ranks.
        prefix: names of the collectives (``prefix.r``).
    """

    def __init__(self, *, hvd: Any, params: list[torch.Tensor], ownership: Ownership,
                 base: Sequence[int], root_of_rank: Sequence[int], my_set_rank: int,
                 process_set: Any, set_size: int, prefix: str) -> None:
        self.hvd, self.process_set, self.set_size, self.prefix = hvd, process_set, set_size, prefix
        self.base, self.counts, self.root_of_rank = base, ownership.counts, root_of_rank
        self.packed = _Packed(params, ownership, base, ownership.total_numel)
        #: Per owner rank, its parameters' indices, ascending (= layout order).
        self.members: list[list[int]] = [[] for _ in self.counts]
        for index, owner in enumerate(self.packed.owners):
            self.members[owner].append(index)
        #: Owners with something to receive (a rank that owns nothing has no slice).
        self.owners = [r for r, count in enumerate(self.counts) if count]
        #: The owners whose slices this process receives and sums.
        self.mine = [r for r in self.owners if root_of_rank[r] == my_set_rank]
        self.handles: dict[int, Any] = {}

    def send(self, owner: int) -> None:
        """Copy the owner's gradients into its slice and launch the slice's ``alltoall``."""
        self.packed.fill(self.members[owner])
        start, count = self.base[owner], self.counts[owner]
        splits = torch.zeros(self.set_size, dtype=torch.int32)
        splits[self.root_of_rank[owner]] = count
        self.handles[owner] = self.hvd.alltoall_async(
            self.packed.buffer[start:start + count], splits=splits,
            name=f"{self.prefix}.{owner}", process_set=self.process_set)

    def unsent(self) -> list[int]:
        return [r for r in self.owners if r not in self.handles]

    def collect(self, into: dict[int, torch.Tensor]) -> None:
        """Wait for every slice; write the sum of each slice received here into
        ``into[owner]`` (a tensor of the slice's length, for every owner in :attr:`mine`)."""
        for owner in self.owners:
            received, _ = self.hvd.synchronize(self.handles.pop(owner))
            if owner in into:
                copies = received.view(self.set_size, self.counts[owner])
                total = into[owner]
                total.copy_(copies[0])
                for copy in copies[1:]:  # set-rank order: the same sum on every run
                    total.add_(copy)


class _HorovodOwnerReduce(_Path):
    """Flat: each rank's slice goes to it with one ``alltoall``, launched from the hook that
    completes the slice (see the module docstring)."""

    uses_hooks = True

    def __init__(self, comm: GradientComm, params: list[torch.Tensor],
                 ownership: Ownership) -> None:
        hvd = comm.horovod()
        self.params = params
        self.rank = comm.rank
        self.runs = _RunsToOwners(
            hvd=hvd, params=params, ownership=ownership, base=ownership.offsets,
            root_of_rank=range(comm.size), my_set_rank=comm.rank,
            process_set=hvd.global_process_set, set_size=comm.size, prefix="grad.owner")
        self.out = params[0].new_zeros(ownership.counts[comm.rank])
        self.owner_of_param = self.runs.packed.owners
        self.ready: set[int] = set()
        self.missing = [len(m) for m in self.runs.members]
        self.last_sent_in_hooks = 0

    def describe(self) -> str:
        return "reducescatter (horovod alltoall to each owner, from the backward hooks)"

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        if index in self.ready:
            return
        self.ready.add(index)
        owner = self.owner_of_param[index]
        self.missing[owner] -= 1
        if self.missing[owner] == 0:
            self.runs.send(owner)

    def finish(self) -> torch.Tensor:
        self.last_sent_in_hooks = len(self.runs.handles)  # what the hooks launched
        for index, param in enumerate(self.params):
            if index not in self.ready:  # no gradient reached it in this backward pass
                _grad_or_zeros(param)
                self.on_ready(index, param)
        self.runs.collect({self.rank: self.out} if self.out.numel() else {})
        self.ready.clear()
        self.missing = [len(m) for m in self.runs.members]
        return self.out


class _HorovodNodeOwnerReduce(_Path):
    """Node-aware: Horovod host allreduce from the hooks; the leader sends each owner's
    slice, once summed over its host, to the owner's host leader (``alltoall`` among the
    leaders); then ``Scatterv`` inside the host (see the module docstring)."""

    uses_hooks = True

    def __init__(self, comm: GradientComm, params: list[torch.Tensor],
                 ownership: Ownership, *, plan: NodePlan, intra: _HorovodAllreduce) -> None:
        hvd = comm.horovod()
        self.comm, self.hvd, self.params, self.plan, self.intra = comm, hvd, params, plan, intra
        self.leader: bool = comm.is_host_leader
        self.out = params[0].new_zeros(ownership.counts[comm.rank])
        self.runs: _RunsToOwners | None = None
        self.last_sent_in_hooks = 0
        if self.leader:
            host = comm.host_index
            self.runs = _RunsToOwners(
                hvd=hvd, params=params, ownership=ownership, base=plan.packed_offsets,
                root_of_rank=comm.layout.host_of_rank, my_set_rank=host,
                process_set=comm.horovod_leaders_set(),
                set_size=comm.layout.hosts, prefix="grad.host_owner")
            # The host's run (host-major), and in it the slice of each of the host's ranks.
            self.share = params[0].new_zeros(plan.host_counts[host])
            first = plan.host_offsets[host]
            self.slices = {r: self.share[plan.packed_offsets[r] - first:
                                         plan.packed_offsets[r] - first + plan.counts[r]]
                           for r in self.runs.mine}
        self._reset()

    def describe(self) -> str:
        return ("reducescatter node-aware (horovod host allreduce, leaders' alltoall per "
                f"owner from the backward hooks, host-major packing: {not self.plan.identity})")

    def _reset(self) -> None:
        # Per owner still to send: its parameters whose host sum is not known to be done,
        # ascending; the backward pass completes the last ones first, so they are popped
        # from the end.
        self.unsummed = ({r: list(self.runs.members[r]) for r in self.runs.owners}
                         if self.runs is not None else {})

    def on_ready(self, index: int, param: torch.Tensor) -> None:
        self.intra.on_ready(index, param)
        if self.runs is None:
            return
        for owner, pending in list(self.unsummed.items()):
            while pending and self._host_summed(pending[-1]):
                pending.pop()
            if not pending:
                del self.unsummed[owner]
                self.runs.send(owner)

    def _host_summed(self, index: int) -> bool:
        handle = self.intra.handles.get(index)
        return handle is not None and self.hvd.poll(handle)

    def finish(self) -> torch.Tensor:
        self.intra.finish()  # every host sum is in .grad now
        share = None
        if self.runs is not None:
            self.last_sent_in_hooks = len(self.runs.handles)  # what the hooks launched
            for owner in self.runs.unsent():
                self.runs.send(owner)
            self.runs.collect(self.slices)
            share = self.share
        self._reset()
        self.comm.host_scatterv_(share, self.out, self.plan)
        return self.out
