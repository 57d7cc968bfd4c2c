"""Which ranks share a host, and where each host's share lies in a host-major vector.

Pure functions of small integer tables (no MPI): every rank computes the same plan from the
same inputs without communicating, and the tests check them without a launcher.

The node-aware collectives move *one copy per host* across the network. To do that with plain
MPI calls among one leader per host, each host's owned elements must form one contiguous run.
Ownership (:mod:`mlbfgs_hpc.partition`) puts rank r's slice at ``offsets[r]`` in rank order; a
*host-major* vector puts host 0's ranks' slices first (in rank order), then host 1's, and so
on. With the usual by-slot placement (ranks 0..L-1 on host 0, L..2L-1 on host 1, ...) the
host-major vector *is* the natural one and nothing is copied; with a round-robin placement
(``--map-by node``) the slices are packed and unpacked around the inter-host step::

    natural (rank order):   | r0 | r1  | r2 | r3  |      hosts: r0, r2 on A; r1, r3 on B
    host-major (packed):    | r0 | r2 | r1  | r3  |
                            |  host A  |  host B  |    <- host_offsets / host_counts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["HostLayout", "NodePlan", "node_plan"]


@dataclass(frozen=True)
class HostLayout:
    """The host of every rank.

    Args:
        host_of_rank: per world rank, the index of its host. Hosts are numbered in the order
            of their lowest rank (host 0 holds rank 0), the numbering MPI's
            ``Split_type(COMM_TYPE_SHARED)`` + one leader per host gives.

    Raises:
        ValueError: empty, or hosts not numbered 0..H-1 in order of their lowest rank.
    """

    host_of_rank: tuple[int, ...]

    def __post_init__(self) -> None:
        hosts = self.host_of_rank
        if not hosts:
            raise ValueError("host_of_rank must name the host of at least one rank")
        seen = -1
        for r, h in enumerate(hosts):
            if isinstance(h, bool) or not isinstance(h, int) or h < 0 or h > seen + 1:
                raise ValueError(
                    f"host_of_rank must number hosts 0, 1, ... in order of their lowest rank; "
                    f"rank {r} has host {h!r} after hosts 0..{seen}")
            seen = max(seen, h)

    @property
    def hosts(self) -> int:
        """Number of hosts H."""
        return max(self.host_of_rank) + 1

    @property
    def world_size(self) -> int:
        return len(self.host_of_rank)

    def ranks_of(self, host: int) -> tuple[int, ...]:
        """World ranks on ``host``, ascending (= their local ranks 0, 1, ...)."""
        return tuple(r for r, h in enumerate(self.host_of_rank) if h == host)

    @property
    def max_ranks_per_host(self) -> int:
        return max(len(self.ranks_of(h)) for h in range(self.hosts))

    @property
    def node_aware_pays(self) -> bool:
        """Whether node-aware collectives can save network traffic: more than one host and
        at least one host running more than one rank (the automatic choice)."""
        return self.hosts > 1 and self.max_ranks_per_host > 1


@dataclass(frozen=True)
class NodePlan:
    """Offsets of a rank-sliced vector in host-major order (see the module docstring).

    Args:
        packed_offsets: per rank, offset of its slice in the host-major vector.
        counts: per rank, length of its slice (the ownership counts).
        natural_offsets: per rank, offset of its slice in the natural vector.
        host_offsets: per host, offset of its run in the host-major vector.
        host_counts: per host, length of its run (sum of its ranks' counts).
        local_ranks: per host, its world ranks, ascending.
        identity: the host-major vector equals the natural one (no packing needed).
    """

    packed_offsets: tuple[int, ...]
    counts: tuple[int, ...]
    natural_offsets: tuple[int, ...]
    host_offsets: tuple[int, ...]
    host_counts: tuple[int, ...]
    local_ranks: tuple[tuple[int, ...], ...]
    identity: bool

    def local_counts(self, host: int) -> list[int]:
        """Counts of ``host``'s ranks, in local-rank order (the intra-host Scatterv/Gatherv)."""
        return [self.counts[r] for r in self.local_ranks[host]]

    def local_displs(self, host: int) -> list[int]:
        """Offsets of ``host``'s ranks' slices relative to the start of the host's run."""
        base = self.host_offsets[host]
        return [self.packed_offsets[r] - base for r in self.local_ranks[host]]

    def moves(self) -> list[tuple[int, int, int]]:
        """``(natural offset, packed offset, count)`` per non-empty slice: what pack and
        unpack copy (empty when :attr:`identity`)."""
        if self.identity:
            return []
        return [(self.natural_offsets[r], self.packed_offsets[r], c)
                for r, c in enumerate(self.counts) if c]


def node_plan(layout: HostLayout, *, counts: Sequence[int], offsets: Sequence[int]) -> NodePlan:
    """The host-major plan for slices ``counts``/``offsets`` (one per rank, in rank order).

    Args:
        layout: the host of every rank.
        counts: per rank, the length of its slice (e.g. ``Ownership.counts``).
        offsets: per rank, the offset of its slice in the natural vector.

    Raises:
        ValueError: the tables disagree in length with the layout, or the slices are not the
            contiguous rank-ordered cover of ``[0, sum(counts))`` that ownership produces.
    """
    p = layout.world_size
    if len(counts) != p or len(offsets) != p:
        raise ValueError(f"counts and offsets need {p} entries (one per rank), got "
                         f"{len(counts)} and {len(offsets)}")
    cursor = 0
    for r, (c, o) in enumerate(zip(counts, offsets)):
        if c < 0 or (c and o != cursor):
            raise ValueError(f"rank {r}'s slice ({o}, {c}) does not continue the previous "
                             f"ranks' slices at {cursor}: ownership slices must be contiguous "
                             "and in rank order")
        cursor += c
    local_ranks = tuple(layout.ranks_of(h) for h in range(layout.hosts))
    packed = [0] * p
    host_offsets: list[int] = []
    host_counts: list[int] = []
    cursor = 0
    for ranks in local_ranks:
        host_offsets.append(cursor)
        for r in ranks:
            packed[r] = cursor
            cursor += counts[r]
        host_counts.append(cursor - host_offsets[-1])
    identity = all(packed[r] == offsets[r] for r in range(p) if counts[r])
    return NodePlan(packed_offsets=tuple(packed), counts=tuple(counts),
                    natural_offsets=tuple(offsets), host_offsets=tuple(host_offsets),
                    host_counts=tuple(host_counts), local_ranks=local_ranks,
                    identity=identity)
