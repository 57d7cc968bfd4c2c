"""Tests of the batched curvature (``mlbfgs_hpc.batched``) against the per-block reference.

* ``H·g`` of all blocks at once equals each block's own :class:`BlockCurvature` (its compact
  form, and its two-loop where ``W`` is not finite) on random blocks with different ring
  fills: no pair, one pair, a rejected pair, a wrapped ring, a non-finite ``W``: float64 to
  1e-12, float32 to rounding (a few ulps of the result's scale).
* The per-block scalars (gᵀg, gᵀd, dᵀd, γ) equal the dots of the reference directions;
  grafting equals the per-block rescale (and a bad scale takes the gradient).
* Bitwise repeatable, and a block's result does not depend on which other blocks are held
  (one rank owning all blocks vs. ranks owning parts of them).
* :func:`choose_chunk`, :class:`ChunkPlan`, argument checks, and the optimizer's state:
  block views of the batched history, loaded and saved unchanged.
"""

from __future__ import annotations

import math

import pytest
import torch

from torch import nn

import mlbfgs_hpc.batched as batched_module
from mlbfgs_hpc.batched import (CHUNK_SIZES, DIRECT_MIN_NUMEL, NO_DIRECT, SCALAR_COLUMNS,
                                BatchedCurvature, ChunkPlan, choose_chunk, scalar_rows)
from mlbfgs_hpc.blocks import build_blocks
from mlbfgs_hpc.config import MLBFGSConfig
from mlbfgs_hpc.curvature import CURVATURE_STATE_KEYS, BlockCurvature
from mlbfgs_hpc.optimizer import MLBFGS

F64, F32 = torch.float64, torch.float32
CPU = torch.device("cpu")
NO_DAMPING = MLBFGSConfig(damping=0.0, sigma_low=0.0, sigma_high=1e12, double_damping=0.0)
M = 4
#: Block sizes (tiny, chunk-straddling, one chunk exactly) and how each ring is filled.
SIZES = (7, 300, 64, 1, 129, 50)
FILLS = ("empty", "wrapped", "rejected", "one", "singular", "full")
#: float32 cannot hold a ρ that makes W overflow in float64 yet keeps the two-loop finite.
FILLS_32 = tuple("full" if f == "singular" else f for f in FILLS)
#: Direct-path thresholds: none; blocks 1 and 4 (300: wrapped, 129: singular or full), so the
#: chunked products run over three runs of chunks between them; every block.
DIRECT = (NO_DIRECT, 100, 1)


def _pair(n: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.randn(n, generator=gen, dtype=F64)
    y = torch.logspace(-1, 1, n, dtype=F64) * s + 0.01 * torch.randn(n, generator=gen,
                                                                     dtype=F64)
    return s.to(dtype), y.to(dtype)


def _fill(curv: BlockCurvature, fill: str, gen: torch.Generator) -> None:
    """Put ``fill``'s history into ``curv`` (through its own offer_pair / state loading)."""
    n, dtype = curv.numel, curv.S.dtype
    offers = {"empty": 0, "one": 1, "rejected": 2, "wrapped": M + 3, "full": M}.get(fill, 0)
    for i in range(offers):
        s, y = _pair(n, gen, dtype)
        if fill == "rejected" and i == 1:
            y = -s                                   # sᵀy < 0: rejected, counted
        curv.offer_pair(s, y, config=NO_DAMPING)
    if fill == "singular":
        # ρ = 1e300 with s = ŷ = e₀: R = [1e-300], so W overflows (not finite) and the block
        # runs the two-loop, which stays finite for a q with q₀ = 0 (see _build).
        state = {k: v.clone() for k, v in curv.state_tensors().items()}
        e0 = torch.zeros(n, dtype=dtype)
        e0[0] = 1.0
        state["S"][0] = e0
        state["Y"][0] = e0
        state["rho"][0] = 1e300
        state["head"].fill_(1)
        state["count"].fill_(1)
        curv.load_state_tensors(state)


def _build(sizes: tuple[int, ...], fills: tuple[str, ...], dtype: torch.dtype, *, seed: int,
           chunk: int, direct: int = NO_DIRECT
           ) -> tuple[BatchedCurvature, list[BlockCurvature], torch.Tensor, torch.Tensor]:
    """A batched curvature and, per block, a reference BlockCurvature with the same ring;
    blocks of ``direct`` elements or more take the direct (GEMV) path."""
    n = sum(sizes)
    grad = torch.zeros(n, dtype=dtype)
    direction = torch.zeros(n, dtype=dtype)
    batched = BatchedCurvature(grad=grad, direction=direction, block_numels=sizes,
                               history_size=M,
                               plan=ChunkPlan(chunk=chunk, direct_min_numel=direct))
    refs = []
    for k, (size, fill) in enumerate(zip(sizes, fills)):
        ref = BlockCurvature(numel=size, history_size=M, dtype=dtype, device=CPU)
        _fill(ref, fill, torch.Generator().manual_seed(seed + k))
        batched.blocks[k].load_state_tensors(ref.state_tensors())
        refs.append(ref)
    batched.refresh()
    grad.copy_(torch.randn(n, generator=torch.Generator().manual_seed(seed + 99), dtype=F64))
    for k, fill in enumerate(fills):
        if fill == "singular":
            grad[sum(sizes[:k])] = 0.0
    return batched, refs, grad, direction


def _reference(refs: list[BlockCurvature], grad: torch.Tensor) -> list[torch.Tensor]:
    out, start = [], 0
    for ref in refs:
        q = grad[start:start + ref.numel].clone()
        out.append(ref.apply_inverse_hessian_(q) if ref.has_curvature else q)
        start += ref.numel
    return out


def _blocks(flat: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    return list(flat.split(list(sizes)))


def test_fixtures_cover_every_ring_state() -> None:
    batched, refs, _, _ = _build(SIZES, FILLS, F64, seed=0, chunk=64)
    by_fill = dict(zip(FILLS, refs))
    assert not by_fill["empty"].has_curvature
    assert int(by_fill["rejected"].rejected) == 1 and int(by_fill["rejected"].count) == 1
    assert int(by_fill["wrapped"].accepted) == M + 3 and int(by_fill["wrapped"].head) == 3
    assert by_fill["singular"].middle_matrix() is None and by_fill["singular"].has_curvature
    assert batched.curved == [k for k, f in enumerate(FILLS) if f != "empty"]
    assert batched.two_loop_blocks == [FILLS.index("singular")]


@pytest.mark.parametrize("direct", DIRECT)
@pytest.mark.parametrize("chunk", [16, 64, 512])
def test_batched_equals_per_block_float64(chunk: int, direct: int) -> None:
    batched, refs, grad, direction = _build(SIZES, FILLS, F64, seed=1, chunk=chunk,
                                            direct=direct)
    assert batched.direct_blocks == [k for k, n in enumerate(SIZES) if n >= direct]
    scalars = batched.precondition_().clone()
    batched.write_direction_()
    expected = _reference(refs, grad)
    for k, (got, want) in enumerate(zip(_blocks(direction, SIZES), expected)):
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) <= 1e-12 * scale, (k, FILLS[k])
        g = grad[sum(SIZES[:k]):sum(SIZES[:k + 1])]
        row = dict(zip(SCALAR_COLUMNS, scalars[k].tolist()))
        assert row["g_sq"] == pytest.approx(float(g @ g), rel=1e-12)
        assert row["g_dot_d"] == pytest.approx(float(g @ want), rel=1e-12, abs=1e-12)
        assert row["d_sq"] == pytest.approx(float(want @ want), rel=1e-12)
        assert row["gamma"] == float(refs[k].gamma)
    empty = FILLS.index("empty")
    assert torch.equal(_blocks(direction, SIZES)[empty], _blocks(grad, SIZES)[empty])


@pytest.mark.parametrize("direct", DIRECT)
def test_batched_equals_per_block_float32_to_rounding(direct: int) -> None:
    batched, refs, grad, direction = _build(SIZES, FILLS_32, F32, seed=2, chunk=64,
                                            direct=direct)
    batched.precondition_()
    batched.write_direction_()
    for k, (got, want) in enumerate(zip(_blocks(direction, SIZES), _reference(refs, grad))):
        # Two summation orders of the same float32 products: a few ulps of the largest term.
        bound = 64 * torch.finfo(F32).eps * float(want.abs().max())
        assert float((got - want).abs().max()) <= bound, (k, FILLS_32[k])


@pytest.mark.parametrize("direct", DIRECT)
def test_bitwise_repeatable_and_independent_of_the_other_blocks(direct: int) -> None:
    """Run twice: identical bits. Blocks 2..4 held alone (as another rank would) give the
    bits they give when held with all others (same chunk size and direct threshold)."""
    batched, _, grad, direction = _build(SIZES, FILLS_32, F32, seed=3, chunk=64,
                                         direct=direct)
    first = batched.precondition_().clone()
    batched.write_direction_()
    d_first = direction.clone()
    second = batched.precondition_().clone()
    batched.write_direction_()
    assert torch.equal(first, second) and torch.equal(direction, d_first)

    part = slice(2, 5)
    sub, _, sub_grad, sub_direction = _build(SIZES[part], FILLS_32[part], F32, seed=3 + 2,
                                             chunk=64, direct=direct)
    start = sum(SIZES[:2])
    sub_grad.copy_(grad[start:start + sub_grad.numel()])
    for k in range(3):     # same rings as the full run's blocks 2..4 (same seeds)
        for key, value in batched.blocks[2 + k].state_tensors().items():
            assert torch.equal(sub.blocks[k].state_tensors()[key], value), key
    sub_scalars = sub.precondition_()
    sub.write_direction_()
    assert torch.equal(sub_scalars, first[part])
    assert torch.equal(sub_direction, d_first[start:start + sub_direction.numel()])


@pytest.mark.parametrize("direct", DIRECT)
def test_segment_reduce_sums_equal_index_add_sums(direct: int) -> None:
    """The non-CPU reduction (segment_reduce, no atomics) gives the CPU one's results."""
    batched, _, _, _ = _build(SIZES, FILLS_32, F32, seed=7, chunk=64, direct=direct)
    via_index_add = batched.precondition_().clone()
    batched.index_add_sums = False
    via_segments = batched.precondition_().clone()
    torch.testing.assert_close(via_segments, via_index_add, rtol=1e-6, atol=0.0)
    assert torch.equal(batched.precondition_(), via_segments)


@pytest.mark.parametrize("direct", DIRECT)
def test_graft_rescales_each_block_and_falls_back_to_the_gradient(direct: int) -> None:
    batched, _, grad, direction = _build(SIZES, FILLS, F64, seed=4, chunk=64, direct=direct)
    batched.precondition_()
    batched.write_direction_()
    before = _blocks(direction.clone(), SIZES)
    one, full = FILLS.index("one"), FILLS.index("full")
    batched.graft_({one: 2.5, full: math.nan})
    batched.write_direction_()
    after = _blocks(direction, SIZES)
    for k in range(len(SIZES)):
        if k == one:
            assert torch.equal(after[k], before[k] * 2.5)
        elif k == full:
            assert torch.equal(after[k], _blocks(grad, SIZES)[k])
        else:
            assert torch.equal(after[k], before[k])


def test_graft_scale_beyond_float32_takes_the_gradient() -> None:
    """sqrt(gᵀg/dᵀd) computed in double can exceed float32's range; multiplied in as an inf
    factor it would have made the step NaN. The block takes its gradient instead."""
    batched, _, grad, direction = _build(SIZES, FILLS_32, F32, seed=4, chunk=64)
    batched.precondition_()
    one = FILLS_32.index("one")
    batched.graft_({one: 1e41})
    batched.write_direction_()
    assert torch.equal(_blocks(direction, SIZES)[one], _blocks(grad, SIZES)[one])
    assert torch.isfinite(direction).all()


@pytest.mark.parametrize("direct", DIRECT)
def test_no_curvature_gives_the_gradient(direct: int) -> None:
    sizes = (5, 40)
    batched, _, grad, direction = _build(sizes, ("empty", "empty"), F32, seed=5, chunk=16,
                                         direct=direct)
    assert batched.curved == []
    rows = scalar_rows(batched.precondition_().tolist())
    batched.write_direction_()
    assert torch.equal(direction, grad)
    for k, g in enumerate(_blocks(grad, sizes)):
        assert rows["g_dot_d"][k] == pytest.approx(float(g @ g), rel=1e-6)


def test_a_rank_without_blocks() -> None:
    """More ranks than blocks: a rank owns none, and its step is a no-op, not an error."""
    batched = BatchedCurvature(grad=torch.zeros(0), direction=torch.zeros(0), block_numels=[],
                               history_size=3, plan=ChunkPlan(chunk=8))
    batched.refresh()
    assert tuple(batched.precondition_().shape) == (0, len(SCALAR_COLUMNS))
    batched.graft_({})
    batched.write_direction_()
    assert scalar_rows([]) == {"g_dot_d": [], "gamma": [], "g_sq": [], "d_sq": []}


def test_block_state_is_a_view_of_the_batched_history() -> None:
    """Writing through a block's S/Y views lands in the shared history (no copies)."""
    batched, _, _, _ = _build(SIZES, FILLS, F64, seed=6, chunk=64)
    block = batched.blocks[1]
    assert set(block.state_tensors()) == set(CURVATURE_STATE_KEYS)
    assert block.S.untyped_storage().data_ptr() == \
        batched.blocks[0].S.untyped_storage().data_ptr()
    assert tuple(block.S.shape) == (M, SIZES[1])


def test_choose_chunk() -> None:
    assert choose_chunk([]) == CHUNK_SIZES[0]
    assert choose_chunk([400_000]) == CHUNK_SIZES[-1]          # one big block: big chunks
    assert choose_chunk([16] * 100) == CHUNK_SIZES[0]          # many tiny ones: small chunks
    sizes = [16] * 40 + [36_864] * 10
    best = choose_chunk(sizes)
    cost = {c: sum(math.ceil(n / c) for n in sizes) * (c + 512) for c in CHUNK_SIZES}
    assert cost[best] == min(cost.values())
    # Direct blocks run no chunked products, so they do not pull the chunk up...
    assert choose_chunk([320, 18_496, 401_536, 1_290], direct_min_numel=2 ** 17) == \
        choose_chunk([320, 18_496, 1_290])
    # ...unless every block is direct.
    assert choose_chunk([400_000], direct_min_numel=2 ** 17) == CHUNK_SIZES[-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"block_numels": [3, 0]}, "block sizes"),
    ({"history_size": 0}, "history_size"),
    ({"block_numels": [3, 3]}, "grad must be a flat tensor of 6"),
])
def test_argument_checks(kwargs: dict, match: str) -> None:
    args = {"grad": torch.zeros(5), "direction": torch.zeros(5), "block_numels": [2, 3],
            "history_size": 2, "plan": ChunkPlan(chunk=4), **kwargs}
    with pytest.raises(ValueError, match=match):
        BatchedCurvature(**args)


@pytest.mark.parametrize("chunk, direct", [(0, 100), (4, 0)])
def test_chunk_plan_checks(chunk: int, direct: int) -> None:
    with pytest.raises(ValueError, match="chunk and direct_min_numel must be >= 1"):
        ChunkPlan(chunk=chunk, direct_min_numel=direct)


def test_chunk_plan_for_model() -> None:
    """The plan carries the threshold its chunk was chosen for: the device's by default."""
    sizes = [320, 18_496, 401_536, 1_290]
    cpu = ChunkPlan.for_model(sizes, device=CPU)
    assert cpu == ChunkPlan(chunk=choose_chunk(sizes, direct_min_numel=DIRECT_MIN_NUMEL),
                            direct_min_numel=DIRECT_MIN_NUMEL)
    assert cpu.chunk == choose_chunk([320, 18_496, 1_290])     # the big block is direct
    off = ChunkPlan.for_model(sizes, device=CPU, direct_min_numel=NO_DIRECT)
    assert off == ChunkPlan(chunk=choose_chunk(sizes, direct_min_numel=NO_DIRECT))
    assert off.chunk > cpu.chunk                                # all-chunked: bigger chunks
    assert ChunkPlan.for_model(sizes, device=torch.device("cuda")).direct_min_numel == NO_DIRECT


def _trained_wide_mlp(monkeypatch: pytest.MonkeyPatch, *, direct: bool
                      ) -> tuple[list[torch.Tensor], MLBFGS]:
    """20 steps of a 2-layer MLP whose first weight (600 × 256 = 153,600) is a direct block
    on a CPU, with the direct path on or forced off."""
    if not direct:
        monkeypatch.setattr(batched_module, "direct_min_numel_for", lambda device: NO_DIRECT)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 600), nn.Tanh(), nn.Linear(600, 3))
    opt = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.05, history_size=3,
                 update_freq=2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(32, 256, generator=gen), torch.randn(32, 3, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


def test_optimizer_takes_the_direct_path_for_a_big_block_and_steps_the_same(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CPU a block of >= DIRECT_MIN_NUMEL elements takes the GEMVs, the others the
    chunked products; 20 steps with pairs end where the all-chunked step ends (float32)."""
    assert 600 * 256 >= DIRECT_MIN_NUMEL > 600
    direct_params, direct_opt = _trained_wide_mlp(monkeypatch, direct=True)
    assert direct_opt._stochastic.batched.direct_blocks == [0]
    assert direct_opt.counters["accepted_pairs"] > 0
    with monkeypatch.context() as patch:
        chunked_params, chunked_opt = _trained_wide_mlp(patch, direct=False)
    assert chunked_opt._stochastic.batched.direct_blocks == []
    for got, want in zip(direct_params, chunked_params):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
