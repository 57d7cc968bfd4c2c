"""Tests of the optimal contiguous block-to-rank partition (``mlbfgs_hpc.partition``).

Optimality is checked against an exhaustive search over all contiguous partitions on many
seeded random small cases; the structural invariants (contiguity, coverage, no empty rank,
Allgatherv counts/displacements) are checked on those and on the edge cases.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Sequence

import pytest

from mlbfgs_hpc.partition import Ownership, linear_partition


def brute_force_bottleneck(costs: Sequence[int], world_size: int) -> int:
    """Smallest max run cost over every split of ``costs`` into <= ``world_size`` contiguous runs."""
    n = len(costs)
    best = sum(costs)
    for groups in range(1, min(world_size, n) + 1):
        for cuts in itertools.combinations(range(1, n), groups - 1):
            bounds = (0, *cuts, n)
            worst = max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds))
            best = min(best, worst)
    return best


def run_costs(costs: Sequence[int], ranges: Sequence[range]) -> list[int]:
    return [sum(costs[b] for b in r) for r in ranges]


def assert_valid_partition(costs: Sequence[int], world_size: int, ranges: Sequence[range]) -> None:
    """Contiguous, in rank order, covering all blocks, and no empty rank when p <= n."""
    n = len(costs)
    assert len(ranges) == world_size
    start = 0
    for r in ranges:
        assert r.step == 1
        assert r.start == start
        assert r.stop >= r.start
        start = r.stop
    assert start == n
    assert [b for r in ranges for b in r] == list(range(n))
    if world_size <= n:
        assert all(len(r) >= 1 for r in ranges)
    else:
        assert [len(r) for r in ranges] == [1] * n + [0] * (world_size - n)
        assert all(r == range(n, n) for r in ranges[n:])


def assert_consistent_ownership(own: Ownership) -> None:
    """Offsets/counts agree with block_offsets, owner agrees with block_ranges."""
    numels = own.block_numels
    total = sum(numels)
    assert own.total_numel == total
    assert list(own.block_offsets) == list(itertools.accumulate(numels[:-1], initial=0))
    for r in range(own.world_size):
        blocks = own.blocks_of(r)
        assert blocks == own.block_ranges[r]
        assert own.counts[r] == sum(numels[b] for b in blocks)
        if len(blocks):
            assert own.offsets[r] == own.block_offsets[blocks.start]
            last = blocks.stop - 1
            assert own.offsets[r] + own.counts[r] == own.block_offsets[last] + numels[last]
        else:
            assert own.offsets[r] == total
            assert own.counts[r] == 0
        assert own.slice_of(r) == slice(own.offsets[r], own.offsets[r] + own.counts[r])
        for b in blocks:
            assert own.owner[b] == r
    # Slices tile the flat vector exactly, as Allgatherv needs.
    assert sum(own.counts) == total
    end = 0
    for r in range(own.world_size):
        assert own.slice_of(r).start == end
        end = own.slice_of(r).stop
    assert end == total


def test_docstring_example() -> None:
    costs = [3, 4, 2, 6, 1, 2]
    own = Ownership.build(block_numels=costs, world_size=3)
    assert own.block_ranges == (range(0, 2), range(2, 4), range(4, 6))
    assert own.owner == (0, 0, 1, 1, 2, 2)
    assert own.offsets == (0, 7, 15)
    assert own.counts == (7, 8, 3)
    assert own.block_offsets == (0, 3, 7, 9, 15, 16)
    assert own.total_numel == 18
    assert brute_force_bottleneck(costs, 3) == 8


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force_optimum(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        n = rng.randint(1, 9)
        p = rng.randint(1, 11)
        # Mix narrow and very wide cost ranges: the latter stresses big single blocks.
        high = rng.choice([3, 20, 1000, 10**9])
        costs = [rng.randint(1, high) for _ in range(n)]
        ranges = linear_partition(costs, p)
        assert_valid_partition(costs, p, ranges)
        assert max(run_costs(costs, ranges)) == brute_force_bottleneck(costs, p), (costs, p)
        assert_consistent_ownership(Ownership.build(block_numels=costs, world_size=p))


def dp_bottleneck(costs: Sequence[int], world_size: int) -> int:
    """Textbook O(p·n²) dynamic programme for the optimal linear partition (independent oracle)."""
    n = len(costs)
    prefix = list(itertools.accumulate(costs, initial=0))
    inf = float("inf")
    # best[k][j]: optimal bottleneck of the first j blocks on at most k ranks.
    best = [[inf] * (n + 1) for _ in range(world_size + 1)]
    for k in range(world_size + 1):
        best[k][0] = 0
    for k in range(1, world_size + 1):
        for j in range(1, n + 1):
            best[k][j] = min(max(best[k - 1][i], prefix[j] - prefix[i]) for i in range(j))
    return int(best[world_size][n])


@pytest.mark.parametrize("seed", range(10))
def test_matches_dynamic_programme_medium(seed: int) -> None:
    rng = random.Random(1000 + seed)
    for _ in range(4):
        n = rng.randint(10, 60)
        p = rng.randint(2, 12)
        costs = [rng.randint(1, rng.choice([5, 10**4, 10**8])) for _ in range(n)]
        ranges = linear_partition(costs, p)
        assert_valid_partition(costs, p, ranges)
        assert max(run_costs(costs, ranges)) == dp_bottleneck(costs, p), (costs, p)


def test_single_rank_owns_everything() -> None:
    costs = [5, 1, 7, 3]
    assert linear_partition(costs, 1) == [range(0, 4)]
    own = Ownership.build(block_numels=costs, world_size=1)
    assert own.offsets == (0,)
    assert own.counts == (16,)
    assert own.owner == (0, 0, 0, 0)
    assert_consistent_ownership(own)


def test_more_ranks_than_blocks() -> None:
    costs = [10, 20, 30]
    ranges = linear_partition(costs, 5)
    assert ranges == [range(0, 1), range(1, 2), range(2, 3), range(3, 3), range(3, 3)]
    own = Ownership.build(block_numels=costs, world_size=5)
    assert own.offsets == (0, 10, 30, 60, 60)
    assert own.counts == (10, 20, 30, 0, 0)
    assert own.owner == (0, 1, 2)
    assert own.blocks_of(4) == range(3, 3)
    assert own.slice_of(3) == slice(60, 60)
    assert_consistent_ownership(own)


def test_equal_ranks_and_blocks_one_each() -> None:
    costs = [9, 1, 1, 1]
    assert linear_partition(costs, 4) == [range(i, i + 1) for i in range(4)]


def test_single_huge_block_sets_bottleneck() -> None:
    costs = [1, 2, 1_000_000, 3, 1, 2, 2]
    for p in range(1, 9):
        ranges = linear_partition(costs, p)
        assert_valid_partition(costs, p, ranges)
        best = brute_force_bottleneck(costs, p)
        assert max(run_costs(costs, ranges)) == best
        if p >= 3:
            # Small blocks before and after the huge one go to their own ranks.
            assert best == 1_000_000
    # Two ranks: the cheaper side (1 + 2 before it, 8 after it) joins the huge block.
    assert linear_partition(costs, 2) == [range(0, 3), range(3, 7)]


def test_all_equal_blocks_balance_exactly() -> None:
    costs = [7] * 12
    for p in (1, 2, 3, 4, 6, 12):
        ranges = linear_partition(costs, p)
        assert [len(r) for r in ranges] == [12 // p] * p
        assert set(run_costs(costs, ranges)) == {7 * 12 // p}
    # Not divisible: optimum is ceil(12 / 5) = 3 blocks on the busiest rank, none empty.
    ranges = linear_partition(costs, 5)
    assert_valid_partition(costs, 5, ranges)
    assert max(len(r) for r in ranges) == 3


def test_no_empty_rank_when_ranks_fit() -> None:
    # One big block at the front tempts a plain greedy to pack all small ones onto rank 1
    # and leave later ranks empty; every rank must still own a block.
    costs = [100] + [1] * 9
    for p in range(1, 11):
        ranges = linear_partition(costs, p)
        assert_valid_partition(costs, p, ranges)
        assert all(len(r) >= 1 for r in ranges)
        assert max(run_costs(costs, ranges)) == (109 if p == 1 else 100)


def test_deterministic() -> None:
    rng = random.Random(1234)
    costs = [rng.randint(1, 10**6) for _ in range(300)]
    first = Ownership.build(block_numels=costs, world_size=17)
    for _ in range(3):
        again = Ownership.build(block_numels=list(costs), world_size=17)
        assert again == first
    assert linear_partition(tuple(costs), 17) == list(first.block_ranges)


def test_accepts_integer_like_values() -> None:
    class Idx:
        def __init__(self, v: int) -> None:
            self.v = v

        def __index__(self) -> int:
            return self.v

    own = Ownership.build(block_numels=[Idx(3), Idx(4)], world_size=Idx(2))  # type: ignore[list-item, arg-type]
    assert own.block_numels == (3, 4)
    assert own.counts == (3, 4)
    assert own.blocks_of(Idx(1)) == range(1, 2)  # type: ignore[arg-type]


@pytest.mark.parametrize("world_size", [0, -1, -4096, 1.5, "2", True, None])
def test_bad_world_size(world_size: object) -> None:
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1"):
        linear_partition([1, 2], world_size)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1"):
        Ownership.build(block_numels=[1, 2], world_size=world_size)  # type: ignore[arg-type]


def test_empty_costs() -> None:
    with pytest.raises(ValueError, match=r"costs must be a non-empty sequence of integers >= 1"):
        linear_partition([], 2)
    with pytest.raises(ValueError, match=r"block_numels must be a non-empty sequence"):
        Ownership.build(block_numels=[], world_size=2)


@pytest.mark.parametrize("bad", [0, -3, 2.0, "4", None, True])
def test_bad_cost_entry(bad: object) -> None:
    with pytest.raises(ValueError, match=r"costs\[1\] must be an integer >= 1"):
        linear_partition([5, bad, 5], 2)  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"block_numels\[1\] must be an integer >= 1"):
        Ownership.build(block_numels=[5, bad, 5], world_size=2)  # type: ignore[list-item]


@pytest.mark.parametrize("rank", [-1, 3, 1.0, True])
def test_bad_rank(rank: object) -> None:
    own = Ownership.build(block_numels=[1, 2, 3], world_size=3)
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 3\)"):
        own.blocks_of(rank)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"rank must be an integer in \[0, 3\)"):
        own.slice_of(rank)  # type: ignore[arg-type]


def test_inconsistent_table_rejected() -> None:
    own = Ownership.build(block_numels=[1, 2, 3, 4], world_size=2)
    with pytest.raises(ValueError, match=r"block_ranges must cover blocks"):
        Ownership(
            world_size=2, block_numels=own.block_numels,
            block_ranges=(range(0, 1), range(1, 3)), owner=own.owner,
            offsets=own.offsets, counts=own.counts, block_offsets=own.block_offsets,
        )
    with pytest.raises(ValueError, match=r"block_ranges\[1\] must be range\("):
        Ownership(
            world_size=2, block_numels=own.block_numels,
            block_ranges=(range(0, 2), range(3, 4)), owner=own.owner,
            offsets=own.offsets, counts=own.counts, block_offsets=own.block_offsets,
        )


@pytest.mark.parametrize(("n_blocks", "world_size"), [(5000, 512), (5000, 4096), (20000, 4096), (5000, 7)])
def test_speed_and_quality_at_scale(n_blocks: int, world_size: int) -> None:
    rng = random.Random(n_blocks * 31 + world_size)
    # Layer sizes spanning biases (tens) to large weight matrices (tens of millions).
    costs = [rng.choice([rng.randint(10, 1000), rng.randint(10**4, 10**6), rng.randint(10**6, 5 * 10**7)])
             for _ in range(n_blocks)]
    t0 = time.perf_counter()
    own = Ownership.build(block_numels=costs, world_size=world_size)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"partition of {n_blocks} blocks over {world_size} ranks took {elapsed:.3f}s"
    ranges = list(own.block_ranges)
    assert_valid_partition(costs, world_size, ranges)
    assert_consistent_ownership(own)
    bottleneck = max(own.counts)
    lower = max(max(costs), -(-sum(costs) // world_size))
    assert bottleneck >= lower
    # Optimality certificate: one element less must be infeasible for any contiguous split.
    # The greedy "fill up to B" reach is maximal, so a greedy count > p proves infeasibility.
    groups, load = 1, 0
    for c in costs:
        if load + c > bottleneck - 1:
            groups, load = groups + 1, c
        else:
            load += c
    assert bottleneck == max(costs) or groups > world_size
