"""Optimal contiguous assignment of parameter blocks to MPI ranks (``DESIGN.md`` §2).

Blocks (contiguous runs of whole layers) are fixed by the model alone; this module decides
which rank *owns* each block. Rank ``r`` owns one contiguous run of blocks, and the runs
minimise the largest per-rank cost, where the cost of a block is its parameter count (an
optimal *linear partition*). The result is a pure function of the block sizes and the world
size, so every rank computes the same table without communicating.

Because ownership is contiguous and blocks are laid out in order in the flat parameter
vector, each rank's blocks form one slice ``[offsets[r], offsets[r] + counts[r])`` of that
vector, and a single ``MPI.Allgatherv`` with ``counts``/``displs = offsets`` assembles the
full update without packing. Example: 6 blocks on 3 ranks, one character per element::

    block            0   1    2  3      4 5
    block_numels     3   4    2  6      1 2         total 18
    flat vector     |000|1111|22|333333|4|55|   (block index of each element)
    owner           |rank 0  |rank 1   |r2  |   owner = (0, 0, 1, 1, 2, 2)
    offsets         0        7         15
    counts          7        8         3     largest per-rank cost = 8
    block_ranges    range(0, 2), range(2, 4), range(4, 6)
    block_offsets   (0, 3, 7, 9, 15, 16)

    MPI.Allgatherv(sendbuf=flat[offsets[me]:offsets[me] + counts[me]],
                   recvbuf=[flat, counts, offsets, dtype])

``3+4 | 2+6 | 1+2`` is the unique optimum here: every other split into 3 contiguous runs puts
9 or more elements on some rank.

With more ranks than blocks, ranks ``0 .. n-1`` own one block each and the remaining ranks own
the empty range ``range(n, n)`` with ``offsets[r] = total_numel`` and ``counts[r] = 0``; they
still take part in every collective (an empty contribution to Allgatherv is legal MPI).

Algorithm: the optimal bottleneck ``B*`` is found by binary search over the integers in
``[max(max cost, ceil(total / p)), total]`` with a greedy feasibility test ("fill each rank
up to B, count ranks"), which is exact because the greedy prefix reach is maximal for any
number of ranks. The greedy test jumps over prefix sums with ``bisect`` so one test costs
``O(min(p, n) · log n)``. Blocks are then assigned greedily at ``B*`` with the extra rule that
a rank stops taking blocks once the remaining blocks would not leave one per remaining rank,
so no rank is empty when ``p <= n`` while the largest cost stays ``B*``.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import operator
from collections.abc import Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["Ownership", "linear_partition"]


def _validate_world_size(world_size: int) -> int:
    """Return ``world_size`` as an int, or raise if it is not an integer >= 1."""
    if isinstance(world_size, bool):
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    try:
        size = operator.index(world_size)
    except TypeError:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}") from None
    if size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    return size


def _validate_costs(costs: Sequence[int], name: str) -> tuple[int, ...]:
    """Return ``costs`` as a tuple of ints, or raise if empty or any entry is not an int >= 1."""
    values = tuple(costs)
    if not values:
        raise ValueError(f"{name} must be a non-empty sequence of integers >= 1, got {values!r}")
    out: list[int] = []
    for i, c in enumerate(values):
        # bool is an int subclass; a True/False block size is certainly a caller bug.
        ok = not isinstance(c, bool)
        if ok:
            try:
                c = operator.index(c)
            except TypeError:
                ok = False
        if not ok or c < 1:
            raise ValueError(f"{name}[{i}] must be an integer >= 1, got {values[i]!r}")
        out.append(c)
    return tuple(out)


def _ranks_needed(prefix: Sequence[int], bottleneck: int, limit: int) -> int:
    """Number of greedy groups of cost <= ``bottleneck`` covering all blocks, capped at ``limit + 1``.

    ``prefix`` holds the prefix sums (``prefix[0] = 0``); every single cost must be <=
    ``bottleneck`` so each group advances by at least one block.
    """
    n = len(prefix) - 1
    pos = 0
    groups = 0
    while pos < n:
        groups += 1
        if groups > limit:
            # Early exit: the caller only needs to know the bottleneck is infeasible.
            return groups
        # Largest j with prefix[j] - prefix[pos] <= bottleneck.
        pos = bisect.bisect_right(prefix, prefix[pos] + bottleneck, lo=pos + 1) - 1
    return groups


def _optimal_bottleneck(prefix: Sequence[int], max_cost: int, world_size: int) -> int:
    """Smallest integer B such that the blocks split into <= ``world_size`` runs of cost <= B."""
    total = prefix[-1]
    # Any partition has some rank with >= the largest block and >= the average load.
    lo = max(max_cost, -(-total // world_size))
    hi = total  # one rank holding everything is always feasible
    while lo < hi:
        mid = (lo + hi) // 2
        if _ranks_needed(prefix, mid, world_size) <= world_size:
            hi = mid
        else:
            lo = mid + 1
    return lo


def linear_partition(costs: Sequence[int], world_size: int) -> list[range]:
    """Split blocks into ``world_size`` contiguous runs minimising the largest run cost.

    Rank ``r`` owns blocks ``range(start_r, stop_r)``; the ranges are contiguous, in rank
    order, and cover all blocks. When ``world_size <= len(costs)`` every range is non-empty;
    otherwise ranks ``0 .. n-1`` own one block each and the rest own ``range(n, n)``. The
    result is deterministic, so all ranks compute the same partition without communicating.

    Args:
        costs: cost of each block in order (its parameter count); integers >= 1, non-empty.
        world_size: number of ranks p; an integer >= 1.

    Returns:
        A list of ``world_size`` ranges of block indices, one per rank.

    Raises:
        ValueError: if ``world_size`` < 1, ``costs`` is empty, or a cost is not an integer >= 1.
    """
    p = _validate_world_size(world_size)
    c = _validate_costs(costs, "costs")
    n = len(c)

    if p >= n:
        # Optimal bottleneck is the largest block: one block per rank, surplus ranks empty.
        return [range(r, r + 1) if r < n else range(n, n) for r in range(p)]

    prefix = list(itertools.accumulate(c, initial=0))
    bottleneck = _optimal_bottleneck(prefix, max(c), p)

    ranges: list[range] = []
    start = 0
    for r in range(p):
        ranks_after = p - r - 1
        # Furthest stop allowed by the bottleneck, then held back so that each later rank
        # still gets at least one block (the "no empty rank" rule). Always >= start + 1
        # because every cost <= bottleneck and n - start >= p - r by induction.
        stop = bisect.bisect_right(prefix, prefix[start] + bottleneck, lo=start + 1) - 1
        stop = min(stop, n - ranks_after)
        ranges.append(range(start, stop))
        start = stop
    # Exactness of the greedy at the optimal bottleneck guarantees full coverage.
    assert start == n, "internal error: linear partition did not cover all blocks"
    return ranges


@dataclass(frozen=True, kw_only=True)
class Ownership:
    """Which rank owns which blocks, and where each rank's slice lies in the flat vector.

    Build it with :meth:`Ownership.build`; the fields are derived data and are checked for
    consistency on construction.

    Args:
        world_size: number of ranks p (>= 1).
        block_numels: parameter count of each block, in layout order (each >= 1).
        block_ranges: per rank, the range of block indices it owns (contiguous, in order).
        owner: per block, the owning rank.
        offsets: per rank, element offset of its slice in the flat vector (the Allgatherv
            displacements); ``total_numel`` for ranks that own nothing.
        counts: per rank, element count of its slice (the Allgatherv counts); 0 for ranks
            that own nothing.
        block_offsets: per block, element offset in the flat vector.
    """

    world_size: int
    block_numels: tuple[int, ...]
    block_ranges: tuple[range, ...]
    owner: tuple[int, ...]
    offsets: tuple[int, ...]
    counts: tuple[int, ...]
    block_offsets: tuple[int, ...]

    def __post_init__(self) -> None:
        # Cheap structural checks so a hand-built or deserialised table cannot silently
        # disagree with itself (which would corrupt the Allgatherv on some rank).
        p = _validate_world_size(self.world_size)
        n = len(self.block_numels)
        if not (len(self.block_ranges) == len(self.offsets) == len(self.counts) == p):
            raise ValueError(
                "block_ranges, offsets and counts must each have world_size="
                f"{p} entries, got {len(self.block_ranges)}, {len(self.offsets)}, "
                f"{len(self.counts)}"
            )
        if not (len(self.owner) == len(self.block_offsets) == n):
            raise ValueError(
                f"owner and block_offsets must each have len(block_numels)={n} entries, "
                f"got {len(self.owner)}, {len(self.block_offsets)}"
            )
        expected_start = 0
        for r, rng in enumerate(self.block_ranges):
            if rng.step != 1 or rng.start != expected_start or rng.stop < rng.start:
                raise ValueError(
                    f"block_ranges[{r}] must be range({expected_start}, k) with k >= "
                    f"{expected_start}, got {rng!r}"
                )
            expected_start = rng.stop
        if expected_start != n:
            raise ValueError(f"block_ranges must cover blocks 0..{n - 1}, stop at {expected_start}")

    @classmethod
    def build(cls, *, block_numels: Sequence[int], world_size: int) -> Ownership:
        """Compute the optimal contiguous ownership table for ``world_size`` ranks.

        Args:
            block_numels: parameter count of each block in layout order; integers >= 1,
                non-empty. The same sequence on every rank gives the same table.
            world_size: number of ranks p; an integer >= 1.

        Returns:
            The ownership table.

        Raises:
            ValueError: if ``world_size`` < 1, ``block_numels`` is empty, or an entry is not
                an integer >= 1.
        """
        numels = _validate_costs(block_numels, "block_numels")
        p = _validate_world_size(world_size)
        ranges = linear_partition(numels, p)

        block_offsets = tuple(itertools.accumulate(numels[:-1], initial=0))
        total = block_offsets[-1] + numels[-1]
        owner = [0] * len(numels)
        offsets: list[int] = []
        counts: list[int] = []
        for r, rng in enumerate(ranges):
            for b in rng:
                owner[b] = r
            if len(rng) == 0:
                # Empty ranks point past the end so displacements stay monotone.
                offsets.append(total)
                counts.append(0)
            else:
                offsets.append(block_offsets[rng.start])
                counts.append(sum(numels[b] for b in rng))

        table = cls(
            world_size=p,
            block_numels=numels,
            block_ranges=tuple(ranges),
            owner=tuple(owner),
            offsets=tuple(offsets),
            counts=tuple(counts),
            block_offsets=block_offsets,
        )
        logger.debug(
            "partitioned %d blocks (%d elements) over %d ranks: max per-rank %d, min %d",
            len(numels), total, p, max(counts), min(counts),
        )
        return table

    def blocks_of(self, rank: int) -> range:
        """Block indices owned by ``rank``.

        Args:
            rank: a rank in ``[0, world_size)``.

        Raises:
            ValueError: if ``rank`` is outside ``[0, world_size)``.
        """
        return self.block_ranges[self._check_rank(rank)]

    def slice_of(self, rank: int) -> slice:
        """Slice of the flat vector holding ``rank``'s blocks (empty for ranks owning none).

        Args:
            rank: a rank in ``[0, world_size)``.

        Raises:
            ValueError: if ``rank`` is outside ``[0, world_size)``.
        """
        r = self._check_rank(rank)
        return slice(self.offsets[r], self.offsets[r] + self.counts[r])

    @property
    def total_numel(self) -> int:
        """Number of elements in the flat vector (sum of all block sizes)."""
        return self.block_offsets[-1] + self.block_numels[-1]

    def _check_rank(self, rank: int) -> int:
        msg = f"rank must be an integer in [0, {self.world_size}), got {rank!r}"
        if isinstance(rank, bool):
            raise ValueError(msg)
        try:
            r = operator.index(rank)
        except TypeError:
            raise ValueError(msg) from None
        if not 0 <= r < self.world_size:
            raise ValueError(msg)
        return r
