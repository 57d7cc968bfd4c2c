"""Every owned block at once: ``H·g``, the per-block scalars and grafting in a fixed number of
kernels, whatever the number of blocks.

A rank's owned blocks are one contiguous slice of the flat vector. Their histories live in ONE
``(2m, n_pad)`` tensor (rows ``0..m-1``: the S ring slots, rows ``m..2m-1``: the Ŷ slots),
each block's columns starting on a multiple of the chunk size C (:func:`choose_chunk`), the
gap after it zero::

    flat owned slice:  | block 0 (700) | block 1 (16) | block 2 (1,300)    |
    history columns:   | block 0 | pad | b1 |  pad    | block 2     | pad  |   (C = 512)
    chunks:            |   c0    |  c1 |     c2      |  c3 |  c4 |   c5   |
    chunk → block:        0       0        1           2     2      2

Block ``k``'s ``(m, nₖ)`` S and Ŷ are plain strided views of that tensor, so each block keeps
a :class:`~mlbfgs_hpc.curvature.BlockCurvature` over its views (its own ring head, count, ρ,
γ, damping, acceptance and compact-form ``W``, exactly as before: pairs are formed every T
steps, block by block). What runs every step is batched over *chunks* of C columns, which
never straddle two blocks::

    g, d padded      (n_pad,)   one _foreach_copy_ in
    proj = g·[S;Ŷ]ᵀ  per chunk  torch.bmm (nch, 1, C) @ (nch, C, 2m)
    per block        (B, 2m)    index_add_ of the chunks' rows (in chunk order)
    c = W·proj       (B, 2m)    torch.bmm with the stacked (B, 2m, 2m) middle matrices
    d = γ·g + [S;Ŷ]ᵀc  per chunk  index_select of c and γ to the chunks, mul, baddbmm_
    gᵀg, gᵀd, dᵀd    (B, 4)     torch.bmm of each chunk's (2, C) [g; d] with itself, index_add_
    grafting         (n_pad,)   one multiply by the blocks' factors (index_select to chunks)
    d out            (n,)       one _foreach_copy_ out

A block of :data:`DIRECT_MIN_NUMEL` elements or more is *direct*: its H·g is the compact form's
two GEMVs over its own ``(2m, n)`` history view (one product of g with [S; Ŷ], one back),
and the chunked products skip its chunks (they run over the runs of chunks between direct
blocks). One GEMV streams a big block's history at least as fast as the largest chunks, and
faster than chunks of the size the model's small blocks want; taking the big block out of
the chunking lets those get small chunks (BENCHMARKS.md §2.1: the CNN, whose 401,536-element
block had pulled C up to 8,192). A big block's few extra calls cost nothing against its own
memory traffic. The scalars and grafting still cover every
chunk, direct blocks included::

    blocks:   | b0 (300) | b1 (200,000: direct)          | b2 (40) |
    chunks:   | c0       | c1 | c2 | …            | c98  | c99     |
    H·g:      bmm over c0  | mv, addmv on b1's view      | bmm over c99
    scalars:  one bmm over c0 … c99 (every block)

Each block's ``W`` is the one :func:`~mlbfgs_hpc.curvature.compact_middle_matrix` builds,
embedded in a ``2m × 2m`` matrix (rows/columns of empty slots zero). A block without pairs has
``W = 0`` and ``γ = 1``, so the same kernels leave its ``d = g``; a block whose ``W`` is not
finite (``R`` numerically singular) also gets ``W = 0, γ = 1`` and then runs its two-loop
recursion on its slice (the fallback the per-block code had). Row-vector products
(``(1, C) @ (C, 2m)``) are used because torch's CPU ``bmm`` takes a slow generic path for
matrix @ column-vector batches (measured 10-40× slower, BENCHMARKS.md §2). The reductions
run per chunk and then over a block's chunks in chunk order, so a block's numbers do not
depend on which other blocks the rank owns (the same on 1 or p ranks) and are bitwise
repeatable; they differ from the per-block GEMVs by float rounding only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .curvature import BlockCurvature
from .layout import ParamSpan
from .stepsize import BLOCK_SCALARS

#: Chunk sizes :func:`choose_chunk` picks from (powers of two).
CHUNK_SIZES: tuple[int, ...] = tuple(2 ** k for k in range(8, 15))   # 256 … 16,384
#: What one more chunk costs, in padded columns: on the reference CPU a chunk's small
#: product costs ~1–2 µs of fixed overhead, the time to stream ~500 columns of a 20-row
#: history (BENCHMARKS.md §2, 2026-12-02).
CHUNK_OVERHEAD_COLUMNS = 512
#: On a CPU, blocks of at least this many elements take H·g by their own two GEMVs ("direct",
#: see the module docstring) instead of the chunked products. Measured on the reference CPU
#: (BENCHMARKS.md §2.1, one block beside a small one, m = 10): the chunks are faster up to
#: 65,536 elements; from 131,072 the GEMVs are 1.06–1.5× faster than 8,192-column chunks and
#: level with the largest (16,384).
DIRECT_MIN_NUMEL = 2 ** 17
#: Off (no block is that large): the GPU path stays all-chunked until measured on a GPU.
NO_DIRECT = 2 ** 62


def direct_min_numel_for(device: torch.device) -> int:
    """The direct-block threshold for blocks on ``device`` (:data:`DIRECT_MIN_NUMEL` on a
    CPU; :data:`NO_DIRECT` elsewhere: the GEMVs of a very wide history have not been timed
    against the chunked products on a GPU)."""
    return DIRECT_MIN_NUMEL if device.type == "cpu" else NO_DIRECT


#: Columns of :meth:`BatchedCurvature.precondition_`'s result, one row per block.
SCALAR_COLUMNS: tuple[str, ...] = ("g_sq", "g_dot_d", "d_dot_g", "d_sq", "gamma")


@dataclass(frozen=True)
class RingTotals:
    """Pairs accepted/rejected over a rank's blocks, and the sum and count of the finite τ of
    their last offered pairs: what the step's allgather needs, summed once per ring change
    (every T steps) rather than per step."""

    accepted: int = 0
    rejected: int = 0
    tau_sum: float = 0.0
    tau_count: int = 0


def choose_chunk(block_numels: Sequence[int], *, direct_min_numel: int = NO_DIRECT) -> int:
    """The chunk size for a model whose blocks have these sizes: the one of
    :data:`CHUNK_SIZES` that minimises padded columns + :data:`CHUNK_OVERHEAD_COLUMNS` × chunks
    (ties: the smaller). Pass *all* the model's blocks, not a rank's, so that a block is cut
    into the same chunks, and so summed in the same order, on any number of ranks.

    Few big blocks get big chunks (fewer calls), many small blocks small ones (less padding).
    Direct blocks (``>= direct_min_numel``; default none, as :class:`ChunkPlan`'s) do not run
    the chunked H·g, so they do not count, unless every block is direct.
    """
    if not block_numels:
        return CHUNK_SIZES[0]
    chunked = [n for n in block_numels if n < direct_min_numel]
    block_numels = chunked or list(block_numels)

    def cost(chunk: int) -> int:
        chunks = sum(math.ceil(n / chunk) for n in block_numels)
        return chunks * chunk + CHUNK_OVERHEAD_COLUMNS * chunks

    return min(CHUNK_SIZES, key=lambda c: (cost(c), c))


@dataclass(frozen=True)
class ChunkPlan:
    """How a model's blocks are batched: the chunk size and the direct-block threshold.

    Build it from *all* the model's blocks (:meth:`for_model`), not a rank's, so that every
    rank cuts a block into the same chunks and sums it in the same order; one object carries
    both values, so the chunk is always the one chosen for that threshold.

    Attributes:
        chunk: columns per chunk (:func:`choose_chunk`).
        direct_min_numel: blocks this large or larger take H·g by their own GEMVs
            (default :data:`NO_DIRECT`: every block chunked).

    Raises:
        ValueError: a value below 1.
    """

    chunk: int
    direct_min_numel: int = NO_DIRECT

    def __post_init__(self) -> None:
        if self.chunk < 1 or self.direct_min_numel < 1:
            raise ValueError(f"chunk and direct_min_numel must be >= 1, got {self.chunk}, "
                             f"{self.direct_min_numel}")

    @classmethod
    def for_model(cls, block_numels: Sequence[int], *, device: torch.device,
                  direct_min_numel: int | None = None) -> ChunkPlan:
        """The plan for a model with blocks of these sizes on ``device`` (threshold: the
        device's, :func:`direct_min_numel_for`, unless given)."""
        direct = direct_min_numel_for(device) if direct_min_numel is None else direct_min_numel
        return cls(chunk=choose_chunk(block_numels, direct_min_numel=direct),
                   direct_min_numel=direct)


class BatchedCurvature:
    """The curvature of a rank's owned blocks, applied to all of them at once.

    Args:
        grad: the flat ``(n,)`` gradient of the owned slice (read by :meth:`precondition_`).
        direction: the flat ``(n,)`` direction buffer (written by :meth:`write_direction_`).
        block_numels: sizes of the owned blocks in flat order (they sum to ``n``).
        history_size: ring capacity m.
        plan: the chunk size and direct threshold (:meth:`ChunkPlan.for_model` of the
            model's blocks).

    Raises:
        ValueError: bad sizes, or buffers that do not match ``block_numels``.
    """

    def __init__(self, *, grad: torch.Tensor, direction: torch.Tensor,
                 block_numels: Sequence[int], history_size: int, plan: ChunkPlan) -> None:
        chunk, direct_min_numel = plan.chunk, plan.direct_min_numel
        numels = [int(n) for n in block_numels]
        if any(n < 1 for n in numels):
            raise ValueError(f"block sizes must be >= 1, got {numels}")
        if history_size < 1:
            raise ValueError(f"history_size must be >= 1, got {history_size}")
        n = sum(numels)
        for name, buf in (("grad", grad), ("direction", direction)):
            if buf.dim() != 1 or buf.numel() != n:
                raise ValueError(f"{name} must be a flat tensor of {n} elements, "
                                 f"got shape {tuple(buf.shape)}")
        m, b_count = history_size, len(numels)
        kw = {"dtype": grad.dtype, "device": grad.device}
        self.history_size, self.chunk = m, chunk
        chunks_per_block = [math.ceil(k / chunk) for k in numels]
        nch = sum(chunks_per_block)
        self.n_chunks, n_pad = nch, nch * chunk
        self.padded_numel = n_pad
        self._history = torch.zeros(2 * m, n_pad, **kw)
        flat_starts = [sum(numels[:k]) for k in range(b_count)]
        pad_starts = [chunk * sum(chunks_per_block[:k]) for k in range(b_count)]
        self.blocks = [BlockCurvature(
            numel=k_n, history_size=m, dtype=grad.dtype, device=grad.device,
            history=(self._history[:m, p:p + k_n], self._history[m:, p:p + k_n]))
            for k_n, p in zip(numels, pad_starts)]
        #: Sum chunks into blocks with index_add_ (CPU) or segment_reduce (see _segment_sum_).
        self.index_add_sums = grad.device.type == "cpu"
        self._chunk_lengths = torch.tensor(chunks_per_block, dtype=torch.long,
                                           device=grad.device)
        self._chunk_block = torch.repeat_interleave(
            torch.arange(b_count, device=grad.device), self._chunk_lengths)
        # Stacked operator: W (transposed for the row-vector product) and γ per block; the
        # ring's γ per block for the read-back.
        self._middle = torch.zeros(b_count, 2 * m, 2 * m, **kw)
        self._middle_t = self._middle.transpose(1, 2)
        self._gamma = torch.ones(b_count, **kw)
        self._ring_gamma = torch.ones(b_count, **kw)
        self.curved: list[int] = []
        self.two_loop_blocks: list[int] = []
        self._curved_direct: set[int] = set()
        self.ring_totals = RingTotals()
        # Padded g (row 0) and d (row 1): [g; d] of a chunk is one (2, C) matrix.
        self._gd = torch.zeros(2, n_pad, **kw)
        g_pad, d_pad = self._gd[0], self._gd[1]
        self._g_pad, self._d_pad = g_pad, d_pad
        self._g_views = [g_pad[p:p + k] for p, k in zip(pad_starts, numels)]
        self._d_views = [d_pad[p:p + k] for p, k in zip(pad_starts, numels)]
        self._grad_views = [grad[s:s + k] for s, k in zip(flat_starts, numels)]
        self._direction_views = [direction[s:s + k] for s, k in zip(flat_starts, numels)]
        # Chunk views (no copies) and the per-step scratch, allocated once.
        self._history_chunks = self._history.view(2 * m, nch, chunk).permute(1, 0, 2)
        self._history_chunks_t = self._history_chunks.transpose(1, 2)
        self._g_chunks = g_pad.view(nch, 1, chunk)
        self._d_chunks = d_pad.view(nch, 1, chunk)
        # Direct blocks: their (2m, n) history views; the chunked H·g runs over the maximal
        # runs of chunks between them, as (first chunk, end chunk) pairs.
        self.direct_blocks = [k for k, k_n in enumerate(numels) if k_n >= direct_min_numel]
        self._direct_history = {k: self._history[:, pad_starts[k]:pad_starts[k] + numels[k]]
                                for k in self.direct_blocks}
        first_chunk = [sum(chunks_per_block[:k]) for k in range(b_count)]
        self._chunk_runs: list[tuple[int, int]] = []
        run_start = 0
        for k in [*self.direct_blocks, b_count]:
            end = first_chunk[k] if k < b_count else nch
            if end > run_start:
                self._chunk_runs.append((run_start, end))
            if k < b_count:
                run_start = end + chunks_per_block[k]
        self._gd_chunks = self._gd.view(2, nch, chunk).permute(1, 0, 2)
        self._proj_chunks = torch.zeros(nch, 1, 2 * m, **kw)
        self._proj = torch.zeros(b_count, 1, 2 * m, **kw)
        self._coeff = torch.zeros(b_count, 1, 2 * m, **kw)
        self._coeff_chunks = torch.zeros(nch, 2 * m, **kw)
        self._gamma_chunks = torch.zeros(nch, **kw)
        self._gram_chunks = torch.zeros(nch, 2, 2, **kw)
        self._scalars = torch.zeros(b_count, len(SCALAR_COLUMNS), **kw)
        self._factor = torch.ones(b_count, **kw)
        self._factor_chunks = torch.zeros(nch, **kw)
        # The chunked H·g's operands per run of chunks (views made once, not per step).
        self._runs = [(self._g_chunks[a:b], self._history_chunks_t[a:b],
                       self._proj_chunks[a:b], self._gamma_chunks[a:b].view(-1, 1, 1),
                       self._d_chunks[a:b], self._coeff_chunks[a:b].view(-1, 1, 2 * m),
                       self._history_chunks[a:b]) for a, b in self._chunk_runs]

    # ---- operator refresh (after pairs are offered or a state is loaded) -----------------
    def refresh(self) -> None:
        """Restack every block's ``W`` and γ from its ring and recount :attr:`ring_totals`
        (call after any ring changed: pairs offered, state loaded)."""
        m = self.history_size
        taus = [c.last_tau for c in self.blocks if math.isfinite(c.last_tau)]
        self.ring_totals = RingTotals(
            accepted=sum(int(c.accepted) for c in self.blocks),
            rejected=sum(int(c.rejected) for c in self.blocks),
            tau_sum=sum(taus), tau_count=len(taus))
        self.curved, self.two_loop_blocks = [], []
        self._curved_direct = set()   # direct blocks that take the GEMVs
        self._middle.zero_()
        self._gamma.fill_(1.0)
        for k, curv in enumerate(self.blocks):
            self._ring_gamma[k].copy_(curv.gamma)
            if not curv.has_curvature:
                continue
            self.curved.append(k)
            w = curv.middle_matrix()
            if w is None:          # W not finite: the two-loop runs on this block's slice
                self.two_loop_blocks.append(k)
                continue
            if k in self._direct_history:
                self._curved_direct.add(k)
            r = w.shape[0] // 2
            target = self._middle[k]
            target[:r, :r].copy_(w[:r, :r])
            target[:r, m:m + r].copy_(w[:r, r:])
            target[m:m + r, :r].copy_(w[r:, :r])
            target[m:m + r, m:m + r].copy_(w[r:, r:])
            self._gamma[k].copy_(curv.gamma)

    # ---- the step -------------------------------------------------------------------------
    def precondition_(self, *, zero: Sequence[ParamSpan] = ()) -> torch.Tensor:
        """``d ← H·g`` for every block (into the padded direction; ``d = g`` for blocks
        without pairs) and the per-block scalars of the step.

        Args:
            zero: runs of elements (``block``: an owned block's position, ``offset`` inside
                it) whose direction is set to zero before the scalars are measured: the
                parameters that sit this step out, whose g is zero but whose H·g need not be
                (their block's pairs couple them to the others).

        Returns:
            ``(B, 5)`` tensor on the parameters' device, columns :data:`SCALAR_COLUMNS`:
            gᵀg, gᵀd, dᵀg, dᵀd of this step and the ring's γ (meaningful for curved blocks).
            A view of internal storage: read it (one transfer) before the next call.
        """
        if self._g_views:   # a rank may own no block (more ranks than blocks)
            torch._foreach_copy_(self._g_views, self._grad_views)
        if self.curved:
            m2 = 2 * self.history_size
            # Direct blocks' chunk rows stay zero: their projections come from one GEMV each.
            for g_run, hist_t_run, proj_run, *_ in self._runs:
                torch.bmm(g_run, hist_t_run, out=proj_run)
            self._segment_sum_(self._proj.view(-1, m2), self._proj_chunks.view(-1, m2))
            for k in self.direct_blocks:
                if k not in self._curved_direct:
                    continue
                torch.mv(self._direct_history[k], self._g_views[k], out=self._proj[k, 0])
            torch.bmm(self._proj, self._middle_t, out=self._coeff)
            torch.index_select(self._coeff.view(-1, m2), 0, self._chunk_block,
                               out=self._coeff_chunks)
            torch.index_select(self._gamma, 0, self._chunk_block, out=self._gamma_chunks)
            for g_run, _, _, gamma_run, d_run, coeff_run, hist_run in self._runs:
                torch.mul(g_run, gamma_run, out=d_run)
                d_run.baddbmm_(coeff_run, hist_run)
            for k in self.direct_blocks:
                if k in self._curved_direct:     # d = γ·g + [S; Ŷ]ᵀ·c, c = W·proj
                    torch.mul(self._g_views[k], self._gamma[k], out=self._d_views[k])
                    self._d_views[k].addmv_(self._direct_history[k].t(), self._coeff[k, 0])
                else:                            # no pairs, or the two-loop below
                    self._d_views[k].copy_(self._g_views[k])
            for k in self.two_loop_blocks:
                self.blocks[k].two_loop_(self._d_views[k])
        else:
            self._d_pad.copy_(self._g_pad)
        for span in zero:
            self._d_views[span.block][span.offset:span.offset + span.stop - span.start].zero_()
        torch.bmm(self._gd_chunks, self._gd_chunks.transpose(1, 2), out=self._gram_chunks)
        self._segment_sum_(self._scalars[:, :4], self._gram_chunks.view(-1, 4))
        self._scalars[:, 4].copy_(self._ring_gamma)
        return self._scalars

    def _segment_sum_(self, out: torch.Tensor, rows: torch.Tensor) -> None:
        """``out[k] = Σ rows[c]`` over block k's chunks c, added in chunk order.

        CPU: ``index_add_`` into ``out`` (sequential, no allocation). Elsewhere
        ``segment_reduce``: CUDA's ``index_add_`` accumulates floats with atomics, whose
        order, and so whose rounding, changes from run to run.
        """
        if self.index_add_sums:
            out.zero_().index_add_(0, self._chunk_block, rows)
        else:
            out.copy_(torch.segment_reduce(rows, "sum", lengths=self._chunk_lengths, axis=0))

    def graft_(self, scales: Mapping[int, float]) -> None:
        """Rescale block ``k``'s padded direction by ``scales[k]`` (one multiply for all);
        a block whose scale is not finite and positive, or beyond the direction dtype's
        range (H·g ~ 0 against a huge g: the float32 factor would be inf and the step NaN),
        takes its gradient instead."""
        factors = [1.0] * len(self.blocks)
        bad = []
        largest = torch.finfo(self._factor.dtype).max
        for k, scale in scales.items():
            if math.isfinite(scale) and 0.0 < scale <= largest:
                factors[k] = scale
            else:
                bad.append(k)
        self._factor.copy_(torch.tensor(factors, dtype=self._factor.dtype))
        torch.index_select(self._factor, 0, self._chunk_block, out=self._factor_chunks)
        self._d_chunks.mul_(self._factor_chunks.view(-1, 1, 1))
        for k in bad:
            self._d_views[k].copy_(self._g_views[k])

    def write_direction_(self) -> None:
        """Copy the padded direction into the flat ``direction`` buffer."""
        if self._d_views:
            torch._foreach_copy_(self._direction_views, self._d_views)

    # ---- read-outs ------------------------------------------------------------------------
    def block_direction(self, k: int) -> torch.Tensor:
        """View of block ``k``'s padded direction (after :meth:`precondition_`)."""
        return self._d_views[k]

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this object allocated (for memory accounting)."""
        return [self._history, self._middle, self._gamma, self._ring_gamma, self._gd,
                self._proj_chunks, self._proj, self._coeff, self._coeff_chunks,
                self._gamma_chunks, self._gram_chunks, self._scalars, self._factor,
                self._factor_chunks, self._chunk_block,
                *(t for c in self.blocks for key, t in c.state_tensors().items()
                  if key not in ("S", "Y"))]


def scalar_rows(values: Sequence[Sequence[float]]) -> dict[str, list[float]]:
    """The read-back of :meth:`BatchedCurvature.precondition_` as
    :data:`~mlbfgs_hpc.stepsize.BLOCK_SCALARS` rows (one value per block)."""
    columns = dict(zip(SCALAR_COLUMNS, zip(*values))) if values else {}
    return {name: list(columns.get(name, ())) for name in BLOCK_SCALARS}
