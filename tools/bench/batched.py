"""``python -m tools.bench batched``: H·g of all owned blocks, batched vs. block by block.

Same process, same rings, interleaved repeat by repeat (so a shared machine's load hits both
alike), on the block sizes of the package's models (one layer per block), history m = 10:

* **per-block**: what ``MLBFGS.step`` did before issue 12, per block ``d ← g``, the compact
  form (``BlockCurvature.apply_inverse_hessian_``: 5 BLAS calls) and three GEMVs for gᵀg, dᵀd,
  gᵀd, then one read-back of the per-block scalars;
* **batched**: :meth:`~mlbfgs_hpc.batched.BatchedCurvature.precondition_` (H·g and the same
  scalars for every block), the read-back, and the copy of the direction out.

Every ring holds m accepted pairs (y = D·s, D diagonal in [0.1, 10]). Also counted: ATen
calls per call of each (torch.profiler, top-level operators), the "handful of kernels".

    python -m tools.bench batched [--repeats 7] [--calls 50] [--device cpu] [--json out.json]
    python -m tools.bench batched --direct-sizes 65536 131072 262144 [--repeats 11]

The second form times one block of each size on the all-chunked path against the direct
(two-GEMV) path that blocks of ``DIRECT_MIN_NUMEL`` elements or more take on a CPU.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mlbfgs_hpc.batched import NO_DIRECT, BatchedCurvature, ChunkPlan
from mlbfgs_hpc.blocks import build_blocks
from mlbfgs_hpc.config import MLBFGSConfig
from mlbfgs_hpc.models import build_model

from . import common

HISTORY = 10
#: (label, model, input shape, classes, options): the models of the overhead benchmark.
MODELS: tuple[tuple[str, str, tuple[int, ...], int, dict[str, Any]], ...] = (
    ("mlp (digits)", "mlp", (1, 8, 8), 10, {}),
    ("cnn (fashion-mnist)", "cnn", (1, 28, 28), 10, {}),
    ("resnet18 width 8", "resnet18", (1, 28, 28), 10, {"width": 8}),
    ("transformer depth 8 width 32", "transformer", (64,), 128, {"depth": 8, "width": 32}),
)


def filled(sizes: Sequence[int], device: torch.device, *, direct: int | None = None
           ) -> tuple[BatchedCurvature, torch.Tensor, torch.Tensor]:
    """A batched curvature over blocks of ``sizes`` with m accepted pairs per block; blocks
    of ``direct`` elements or more take the GEMVs (default: the package's threshold)."""
    n = sum(sizes)
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(n, generator=gen).to(device)
    direction = torch.zeros(n, device=device)
    batched = BatchedCurvature(grad=grad, direction=direction, block_numels=sizes,
                               history_size=HISTORY,
                               plan=ChunkPlan.for_model(sizes, device=device,
                                                        direct_min_numel=direct))
    config = MLBFGSConfig()
    for curv in batched.blocks:
        diag = torch.logspace(-1, 1, curv.numel).to(device)
        for _ in range(HISTORY):
            s = torch.randn(curv.numel, generator=gen).to(device)
            curv.offer_pair(s, diag * s, config=config)
    batched.refresh()
    return batched, grad, direction


def per_block_step(batched: BatchedCurvature, grad: torch.Tensor,
                   direction: torch.Tensor) -> Callable[[], None]:
    """The pre-issue-12 per-block H·g and scalars, on the same rings."""
    starts = [0]
    for curv in batched.blocks:
        starts.append(starts[-1] + curv.numel)
    scalars = torch.zeros(3, len(batched.blocks), device=grad.device)
    views = [(curv, grad[a:b], direction[a:b], k)
             for k, (curv, a, b) in enumerate(zip(batched.blocks, starts, starts[1:]))]

    def run() -> None:
        for curv, g, d, k in views:
            d.copy_(g)
            curv.apply_inverse_hessian_(d)
            torch.mv(g.view(1, -1), g, out=scalars[0, k:k + 1])
            torch.mv(d.view(1, -1), d, out=scalars[1, k:k + 1])
            torch.mv(g.view(1, -1), d, out=scalars[2, k:k + 1])
        scalars.tolist()

    return run


def batched_step(batched: BatchedCurvature) -> Callable[[], None]:
    def run() -> None:
        batched.precondition_().tolist()
        batched.write_direction_()

    return run


def aten_calls(fn: Callable[[], None]) -> int:
    """Top-level ATen operators one call of ``fn`` issues."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def _interleaved(runs: dict[str, Callable[[], None]], *, device: torch.device, repeats: int,
                 calls: int) -> dict[str, list[float]]:
    """Seconds per call of each run: ``repeats`` windows of ``calls`` calls, the runs'
    order reversed every other repeat (machine drift hits all alike)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            runs[name]()
            sync()
            start = time.perf_counter()
            for _ in range(calls):
                runs[name]()
            sync()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def measure(label: str, sizes: Sequence[int], *, device: torch.device, repeats: int,
            calls: int) -> dict[str, Any]:
    """Per-block against batched; where the model has direct blocks, also the batched step
    with every block chunked (what it was before direct blocks)."""
    batched, grad, direction = filled(sizes, device)
    runs = {"per-block": per_block_step(batched, grad, direction),
            "batched": batched_step(batched)}
    if batched.direct_blocks:
        runs["all-chunked"] = batched_step(filled(sizes, device, direct=NO_DIRECT)[0])
    times = _interleaved(runs, device=device, repeats=repeats, calls=calls)
    ratios = {f"{name.replace('-', '_')}_over_batched": common.summarize(
        a / b for a, b in zip(times[name], times["batched"]))
        for name in runs if name != "batched"}
    return {
        "label": label, "blocks": len(sizes), "parameters": sum(sizes),
        "chunk": batched.chunk, "padded": batched.padded_numel,
        "direct_blocks": len(batched.direct_blocks),
        "ms": {name: common.summarize(1e3 * t for t in ts) for name, ts in times.items()},
        **ratios,
        "aten_calls": {name: aten_calls(fn) for name, fn in runs.items()},
    }


#: The small block that sits beside the measured one in :func:`measure_direct` (the CNN's
#: last layer), so that the chunked products have a run of their own either way.
COMPANION_NUMEL = 1_290


def measure_direct(numel: int, *, device: torch.device, repeats: int) -> dict[str, Any]:
    """One block of ``numel`` elements (beside a :data:`COMPANION_NUMEL` one): H·g, scalars,
    read-back and direction out, all-chunked against the big block on the direct path."""
    sizes = [COMPANION_NUMEL, numel]
    chunked = filled(sizes, device, direct=NO_DIRECT)[0]
    runs = {"chunked": batched_step(chunked),
            "direct": batched_step(filled(sizes, device, direct=numel)[0])}
    times = _interleaved(runs, device=device, repeats=repeats,
                         calls=max(5, 3_000_000 // numel))
    return {"numel": numel, "chunk": chunked.chunk,
            "ms": {name: common.summarize(1e3 * t for t in ts) for name, ts in times.items()},
            "chunked_over_direct": common.summarize(
                a / b for a, b in zip(times["chunked"], times["direct"]))}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench batched",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=50, help="calls per timed window")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--direct-sizes", type=int, nargs="+", default=None, metavar="N",
                        help="instead: one block of each size, all-chunked H·g against the "
                             "direct (GEMV) path (where DIRECT_MIN_NUMEL comes from)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.direct_sizes:
        key, rows = "direct", _direct_table(args.direct_sizes, device=device,
                                            repeats=args.repeats)
    else:
        key, rows = "results", _model_table(device=device, repeats=args.repeats,
                                            calls=args.calls)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": str(device), "threads": args.threads, "history": HISTORY,
                       key: rows}, f, indent=1)
    return 0


def _direct_table(sizes: Sequence[int], *, device: torch.device, repeats: int
                  ) -> list[dict[str, Any]]:
    print("| block elements | chunk | all-chunked ms | direct ms | chunked / direct |")
    print("|---|---|---|---|---|")
    rows = []
    for numel in sizes:
        res = measure_direct(numel, device=device, repeats=repeats)
        rows.append(res)
        print(f"| {numel:,} | {res['chunk']} | {common.fmt_stat(res['ms']['chunked'])} | "
              f"{common.fmt_stat(res['ms']['direct'])} | "
              f"{common.fmt_stat(res['chunked_over_direct'])} |", flush=True)
    return rows


def _model_table(*, device: torch.device, repeats: int, calls: int) -> list[dict[str, Any]]:
    print("| model | blocks (direct) | parameters | chunk | per-block ms | batched ms | "
          "per-block / batched | all-chunked / batched | ATen calls per-block / batched |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for label, model, shape, classes, options in MODELS:
        sizes = [b.numel for b in build_blocks(build_model(
            model, in_shape=shape, num_classes=classes, **options))]
        res = measure(label, sizes, device=device, repeats=repeats, calls=calls)
        rows.append(res)
        ms = res["ms"]
        chunked = (common.fmt_stat(res["all_chunked_over_batched"])
                   if "all_chunked_over_batched" in res else "no direct block")
        print(f"| {label} | {res['blocks']} ({res['direct_blocks']}) | {res['parameters']:,} | "
              f"{res['chunk']} | {common.fmt_stat(ms['per-block'])} | "
              f"{common.fmt_stat(ms['batched'])} | "
              f"{common.fmt_stat(res['per_block_over_batched'])} | {chunked} | "
              f"{res['aten_calls']['per-block']} / {res['aten_calls']['batched']} |", flush=True)
    return rows
