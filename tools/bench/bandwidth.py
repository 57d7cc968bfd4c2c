"""The physical limit of H·g: memory bandwidth, the two-loop recursion and the compact form.

The L-BFGS two-loop recursion does ~4 flops per float it touches, so on any CPU it is bound by
memory bandwidth, not by arithmetic. This module measures, in the same process and
interleaved repeat by repeat (so a shared machine's drifting load hits both alike):

* **STREAM triad** ``a = b + s·c`` on float32 arrays of 2**25 elements each (128 MiB, 4× the
  32 MiB L3 of the reference machine; STREAM's rule), as one fused ``torch.add(b, c,
  alpha=s, out=a)``. Bytes counted the STREAM way: 3 streams × 4 B × n (read b, read c,
  write a). On a write-allocate cache the store to ``a`` also reads ``a`` first, so the
  traffic the memory system really carries is 4 streams; STREAM's convention ignores that,
  so its figure *under*-states the hardware by up to 4/3. Also reported: the in-place AXPY
  ``b += s·c`` (3 streams, no write-allocate penalty since ``b`` is read anyway), which is
  exactly the access pattern of the two-loop's updates, and a dot product (2 read streams).
* **The two-loop recursion** of :class:`mlbfgs_hpc.curvature.BlockCurvature`, its
  reference method ``two_loop_`` unchanged. Bytes it must move per call with ``k`` stored pairs
  on a block of ``n`` float32 parameters, kernel by kernel as the code executes them:

  ====================  ===========================  ===============
  loop 1, per pair      ``mv(S_i, q)`` (dot)         read S_i, q: 2n
                        ``q.addcmul_(Y_i, −α_i)``    read Y_i, q, write q: 3n
  middle                ``q.mul_(γ)``                read q, write q: 2n
  loop 2, per pair      ``mv(Y_i, q)`` (dot)         read Y_i, q: 2n
                        ``q.addcmul_(S_i, β)``       read S_i, q, write q: 3n
  ====================  ===========================  ===============

  total ``(10k + 2)·n·4`` bytes (scalar traffic is negligible); the benchmark times it
  together with the copy ``d ← g`` that precedes it in ``MLBFGS.step`` (+2n), i.e.
  ``(10k + 4)·n·4`` bytes per timed call. The dot of each pass must
  finish before its AXPY starts (α_i depends on the whole vector), so no fusion of the
  standard recursion can go below ``8k·n`` reads of history + q traffic; the writes are in
  place (no write-allocate penalty).
* **The compact (matrix) form** of Byrd, Nocedal and Schnabel (1994, "Representations of
  quasi-Newton matrices and their use in limited memory methods", Math. Prog. 63):
  ``H·q = γq + Sᵀc_S + Ŷᵀc_Y`` with ``[c_S; c_Y] = W·[S q; Ŷ q]`` where the 2k×2k matrix
  ``W`` depends only on the history (rebuilt when a pair is accepted, i.e. every T steps).
  Per step: two GEMVs out (``S q``, ``Ŷ q``: read 2k·n + 2n), a tiny 2k×2k product, two
  GEMVs back (``q ← γq + Sᵀc_S``, ``q += Ŷᵀc_Y``: read 2k·n + 3n, write 2n) — total
  ``(4k + 7)·n·4`` bytes (``(4k + 9)·n·4`` with the copy ``d ← g``), ~2.5× less than the loop, in 4 BLAS-2 calls instead of 4k BLAS-1
  calls. Measured faster than the loop on every size here, it is what
  ``BlockCurvature.apply_inverse_hessian_`` (so ``MLBFGS.step``) uses; it is checked against the
  loop in float64 here.

Which bytes reach DRAM depends on the cache (32 MiB L3 on the reference machine): the history
(2k·n floats) is read twice per call in both forms, ``4k·n·4`` bytes, and that is the DRAM
traffic floor once the history outgrows the cache; ``q`` (n floats) is re-read and re-written
by every kernel of the loop, which costs DRAM bandwidth only when ``q`` itself outgrows the
cache (n = 1e7: 40 MB). Both counts are reported ("kernel bytes" and "history bytes"), and
each configuration is also compared with a triad of the *same footprint* ((2k+1)·n floats in
3 arrays): small blocks fit in cache and run faster than DRAM allows.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from mlbfgs_hpc.config import MLBFGSConfig
from mlbfgs_hpc.curvature import BlockCurvature

from . import common

logger = logging.getLogger(__name__)

#: STREAM array length: 2**25 float32 = 128 MiB per array, 4× a 32 MiB L3.
STREAM_N = 1 << 25
BYTES_F32 = 4


# ------------------------------------------------------------------------- measurements

def filled_curvature(n: int, m: int, *, dtype: torch.dtype, seed: int,
                      device: torch.device | str = "cpu") -> BlockCurvature:
    """A BlockCurvature whose ring has wrapped (m + 3 pairs offered) on a diagonal model.

    Pairs come from a quadratic with a diagonal Hessian h ∈ [0.1, 10] plus 10 % noise, so
    sᵀy > 0 and the real damping/acceptance code of curvature.py fills the ring. The ring
    is filled on the CPU (same numbers on every machine) and copied to ``device``.
    """
    if torch.device(device).type != "cpu":
        cpu = filled_curvature(n, m, dtype=dtype, seed=seed)
        curv = BlockCurvature(numel=n, history_size=m, dtype=dtype, device=torch.device(device))
        curv.load_state_tensors(cpu.state_tensors())
        return curv
    gen = torch.Generator().manual_seed(seed)
    h = torch.empty(n, dtype=dtype).uniform_(0.1, 10.0, generator=gen)
    curv = BlockCurvature(numel=n, history_size=m, dtype=dtype, device=torch.device("cpu"))
    config = MLBFGSConfig()
    offered = 0
    while offered < m + 3:
        s = torch.randn(n, dtype=dtype, generator=gen)
        y = h * s + 0.1 * torch.randn(n, dtype=dtype, generator=gen) * s.abs().mean()
        curv.offer_pair(s, y, config=config)
        offered += 1
    if int(curv.count) != m:
        raise RuntimeError(f"ring not full: {int(curv.count)} of {m} pairs accepted")
    return curv


def check_compact_correctness(*, n: int = 100_000, histories: tuple[int, ...] = (5, 10, 20),
                              seed: int = 7) -> list[dict[str, Any]]:
    """Relative error of the compact form against the two-loop, in float64 and float32."""
    rows = []
    for m in histories:
        ref = filled_curvature(n, m, dtype=torch.float64, seed=seed)
        g = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
        loop64 = ref.two_loop_(g.clone())
        comp64 = ref.apply_inverse_hessian_(g.clone())
        rel64 = float((comp64 - loop64).norm() / loop64.norm())

        cur32 = BlockCurvature(numel=n, history_size=m, dtype=torch.float32,
                               device=torch.device("cpu"))
        cur32.load_state_tensors({k: (v.float() if v.is_floating_point() else v)
                                  for k, v in ref.state_tensors().items()})
        loop32 = cur32.two_loop_(g.float())
        comp32 = cur32.apply_inverse_hessian_(g.float())
        rows.append({
            "history": m, "n": n,
            "rel_err_compact_vs_loop_f64": rel64,
            "rel_err_loop_f32_vs_f64": float((loop32.double() - loop64).norm() / loop64.norm()),
            "rel_err_compact_f32_vs_f64": float((comp32.double() - loop64).norm()
                                                / loop64.norm()),
        })
        logger.info("compact form m=%d: rel. error vs loop %.2e (f64), f32 loop %.2e, "
                    "f32 compact %.2e", m, rel64, rows[-1]["rel_err_loop_f32_vs_f64"],
                    rows[-1]["rel_err_compact_f32_vs_f64"])
    return rows


def _timed(fn: Any, inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner


def stream_reference(*, n: int = STREAM_N, repeats: int = 10) -> dict[str, Any]:
    """STREAM-style triad, in-place AXPY and dot bandwidth (GB/s = 1e9 B/s) on float32."""
    a = torch.zeros(n)
    b = torch.rand(n)
    c = torch.rand(n)
    scalar = 3.0
    kernels = {
        # name: (callable, bytes per call counted as streams x 4 B x n)
        "triad": (lambda: torch.add(b, c, alpha=scalar, out=a), 3 * BYTES_F32 * n),
        "axpy_inplace": (lambda: b.add_(c, alpha=1e-9), 3 * BYTES_F32 * n),
        "dot": (lambda: torch.dot(b, c), 2 * BYTES_F32 * n),
        "copy": (lambda: a.copy_(b), 2 * BYTES_F32 * n),
    }
    out: dict[str, Any] = {"n": n, "bytes_per_array": BYTES_F32 * n,
                           "threads": torch.get_num_threads()}
    for name, (fn, nbytes) in kernels.items():
        fn()  # first touch / page faults outside the timing
        times = [_timed(fn, 1) for _ in range(repeats)]
        gbs = [nbytes / t / 1e9 for t in times]
        out[name] = {"bytes": nbytes, "gbps": common.summarize(gbs), "best_gbps": max(gbs),
                     "seconds": common.summarize(times)}
        logger.info("%-13s %.1f GB/s best, %.1f median", name, max(gbs),
                    out[name]["gbps"]["median"])
    del a, b, c
    return out


def two_loop_vs_bandwidth(*, sizes: tuple[int, ...], histories: tuple[int, ...],
                          repeats: int, min_seconds: float = 0.02,
                          seed: int = 11) -> list[dict[str, Any]]:
    """Time the loop, the compact form and two triads, interleaved, for every (m, n)."""
    big_a, big_b, big_c = torch.zeros(STREAM_N), torch.rand(STREAM_N), torch.rand(STREAM_N)
    big_triad = lambda: torch.add(big_b, big_c, alpha=3.0, out=big_a)  # noqa: E731
    big_triad()
    big_bytes = 3 * BYTES_F32 * STREAM_N
    rows = []
    for m in histories:
        for n in sizes:
            curv = filled_curvature(n, m, dtype=torch.float32, seed=seed)
            k = int(curv.count)
            g = torch.randn(n)
            q = g.clone()
            # Each call starts with d <- g, as in MLBFGS.step (and H·H·…·g would overflow);
            # the copy's 2n floats are counted in the bytes below.
            loop = lambda: curv.two_loop_(q.copy_(g))  # noqa: E731
            compact = lambda: curv.apply_inverse_hessian_(q.copy_(g))  # noqa: E731
            # Same-footprint triad: 3 arrays holding (2k+1)·n floats together.
            fn = max(1, ((2 * k + 1) * n) // 3)
            fa, fb, fc = torch.zeros(fn), torch.rand(fn), torch.rand(fn)
            foot_triad = lambda: torch.add(fb, fc, alpha=3.0, out=fa)  # noqa: E731
            for f in (loop, compact, foot_triad):
                f()
            # Enough calls per timed batch to dwarf the timer for small blocks.
            t_probe = _timed(loop, 1)
            inner = max(1, int(min_seconds / max(t_probe, 1e-7)))
            samples: dict[str, list[float]] = {"loop": [], "compact": [], "triad_dram": [],
                                               "triad_footprint": []}
            for _ in range(repeats):
                samples["triad_dram"].append(_timed(big_triad, 1))
                samples["loop"].append(_timed(loop, inner))
                samples["compact"].append(_timed(compact, inner))
                samples["triad_footprint"].append(_timed(foot_triad, inner))
            # + 2n for the copy d <- g that precedes the recursion in MLBFGS.step as here.
            loop_bytes = (10 * k + 4) * n * BYTES_F32
            compact_bytes = (4 * k + 9) * n * BYTES_F32
            # S and Ŷ are each read twice (once per loop) whatever the kernels: the DRAM
            # traffic floor when q stays in cache but the history does not.
            history_bytes = 4 * k * n * BYTES_F32
            loop_gbs = [loop_bytes / t / 1e9 for t in samples["loop"]]
            hist_gbs = [history_bytes / t / 1e9 for t in samples["loop"]]
            comp_gbs = [compact_bytes / t / 1e9 for t in samples["compact"]]
            dram_gbs = [big_bytes / t / 1e9 for t in samples["triad_dram"]]
            foot_gbs = [3 * BYTES_F32 * fn / t / 1e9 for t in samples["triad_footprint"]]
            row = {
                "history": m, "n": n, "pairs": k, "inner_calls": inner,
                "loop_bytes": loop_bytes, "compact_bytes": compact_bytes,
                "loop_ms": common.summarize(1e3 * t for t in samples["loop"]),
                "compact_ms": common.summarize(1e3 * t for t in samples["compact"]),
                "loop_gbps": common.summarize(loop_gbs),
                "compact_gbps": common.summarize(comp_gbs),
                "triad_dram_gbps": common.summarize(dram_gbs),
                "triad_footprint_gbps": common.summarize(foot_gbs),
                # Per-repeat ratios: each against the triad measured right next to it.
                "loop_fraction_of_dram_triad": common.summarize(
                    lg / dg for lg, dg in zip(loop_gbs, dram_gbs)),
                "history_bytes": history_bytes,
                "loop_history_gbps": common.summarize(hist_gbs),
                "loop_history_fraction_of_dram_triad": common.summarize(
                    hg / dg for hg, dg in zip(hist_gbs, dram_gbs)),
                "loop_fraction_of_footprint_triad": common.summarize(
                    lg / fg for lg, fg in zip(loop_gbs, foot_gbs)),
                "compact_fraction_of_dram_triad": common.summarize(
                    cg / dg for cg, dg in zip(comp_gbs, dram_gbs)),
                "compact_speedup": common.summarize(
                    tl / tc for tl, tc in zip(samples["loop"], samples["compact"])),
            }
            rows.append(row)
            logger.info("two-loop m=%2d n=%9d: %.3f ms (%.1f GB/s = %.2f of triad), compact "
                        "%.3f ms (x%.2f)", m, n, row["loop_ms"]["median"],
                        row["loop_gbps"]["median"],
                        row["loop_fraction_of_dram_triad"]["median"],
                        row["compact_ms"]["median"], row["compact_speedup"]["median"])
            del curv, g, q, fa, fb, fc
    return rows


def stream_kernel_model_ms(row: dict[str, Any], stream: dict[str, Any]) -> dict[str, float]:
    """The "speed of light" of both forms: every kernel at its own large-array STREAM rate.

    Loop: copy d ← g (2n, copy rate); 2k dots (2n each, dot rate); 2k AXPYs and the γ
    scaling (3n and 2n, in-place AXPY rate). Compact: copy; two GEMVs out ((k+1)·n reads
    each, dot rate); γ scaling; two GEMVs back ((k+2)·n each, AXPY rate). The measured time
    over this model's time is the fraction of the memory-bandwidth limit reached; above 1 the
    kernels beat DRAM streaming because ``q`` (n floats) stays in cache between them.
    """
    k, n = row["pairs"], row["n"]
    rate = {name: stream[name]["gbps"]["median"] * 1e9 / 1e3 for name in
            ("dot", "axpy_inplace", "copy")}  # bytes per ms
    f = BYTES_F32
    loop = (2 * n * f / rate["copy"] + 2 * k * 2 * n * f / rate["dot"]
            + (2 * k * 3 * n + 2 * n) * f / rate["axpy_inplace"])
    compact = (2 * n * f / rate["copy"] + 2 * (k + 1) * n * f / rate["dot"]
               + (2 * n + 2 * (k + 2) * n) * f / rate["axpy_inplace"])
    return {"loop_model_ms": loop, "compact_model_ms": compact,
            "loop_fraction_of_model": loop / row["loop_ms"]["median"],
            "compact_fraction_of_model": compact / row["compact_ms"]["median"]}


def run(*, quick: bool, out_dir: Any) -> dict[str, Any]:
    """The whole bandwidth benchmark; returns the JSON-ready result."""
    sizes = (10_000, 100_000, 1_000_000) if quick else (10_000, 100_000, 1_000_000, 10_000_000)
    histories = (10,) if quick else (5, 10, 20)
    repeats = 3 if quick else 7
    start = time.perf_counter()
    result = {
        "stream": stream_reference(repeats=4 if quick else 10),
        "correctness": check_compact_correctness(
            n=20_000 if quick else 100_000, histories=histories),
        "two_loop": two_loop_vs_bandwidth(sizes=sizes, histories=histories, repeats=repeats),
        "seconds": math.nan,
    }
    for row in result["two_loop"]:
        row.update(stream_kernel_model_ms(row, result["stream"]))
    result["seconds"] = time.perf_counter() - start
    return result


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    """Time per call against n, with the STREAM-kernel limit; and the fraction of it."""
    plt = common.use_agg_backend()
    for row in res["two_loop"]:
        if "loop_model_ms" not in row:
            row.update(stream_kernel_model_ms(row, res["stream"]))
    fig, axes = plt.subplots(1, 2, figsize=(10.4, 3.9), dpi=90)
    for m in sorted({r["history"] for r in res["two_loop"]}):
        rows = [r for r in res["two_loop"] if r["history"] == m]
        ns = [r["n"] for r in rows]
        line, = axes[0].plot(ns, [r["loop_ms"]["median"] for r in rows], "o-",
                             label=f"two-loop m={m}")
        color = line.get_color()
        axes[0].plot(ns, [r["compact_ms"]["median"] for r in rows], "s--", color=color,
                     label=f"compact m={m}")
        axes[0].plot(ns, [r["loop_model_ms"] for r in rows], ":", color=color, lw=1,
                     label=f"two-loop at STREAM rates m={m}")
        axes[1].plot(ns, [r["loop_fraction_of_model"] for r in rows], "o-", color=color,
                     label=f"two-loop m={m}")
        axes[1].plot(ns, [r["compact_fraction_of_model"] for r in rows], "s--", color=color,
                     label=f"compact m={m}")
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("block size n (float32 parameters)")
    axes[0].set_ylabel("ms per H·g (incl. d ← g)")
    axes[0].legend(fontsize=6, ncol=1)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("block size n")
    axes[1].set_ylabel("STREAM-kernel time / measured time")
    st = res["stream"]
    axes[1].set_title(f"1.0 = every kernel at its large-array rate (dot "
                      f"{st['dot']['gbps']['median']:.0f}, axpy "
                      f"{st['axpy_inplace']['gbps']['median']:.0f} GB/s)", fontsize=8)
    axes[1].legend(fontsize=6)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path = out / "bandwidth.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
