"""``python -m tools.bench gpu``: the CUDA path of mlbfgs-hpc, measured on one GPU.

Not a section of the CPU harness (whose figures are this project's CPU machine): it needs
a GPU, and says so and exits 2 without one. One command, two measurements, every speed figure
a ratio to a baseline timed in the same process:

* **iteration** (``overhead.measure_config`` with ``--device cuda``): whole training
  iteration of mL-BFGS (history 10, T = 50, ring full) and Adam over SGD-momentum, same
  model, data and global batch 128, on the small CNN and on ResNet-18; plus the mL-BFGS step
  broken into its pieces, each timer synchronising the device.
* **two-loop**: the recursion of ``BlockCurvature`` on one block of n float32 parameters
  (history 10, ring full): the reference two-loop (``two_loop_``) and the compact form that
  ``MLBFGS`` uses (``apply_inverse_hessian_``), against a triad of the same footprint on the
  same GPU, timed with CUDA events. On a GPU a block
  of 10^5 parameters is far too small to fill the memory system: the 4k + 1 dependent
  kernel launches per block, not bandwidth, set the time, which the table shows.

::

    python -m tools.bench gpu --out bench-gpu [--quick] [--data-root DIR]

Writes ``results.json`` and ``summary.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import common
from . import overhead as bench_overhead
from .bandwidth import BYTES_F32, filled_curvature

logger = logging.getLogger(__name__)

#: (label, model) of the iteration timings; the data set is Fashion-MNIST when its files are
#: found, else the synthetic set reshaped by nothing (timings depend on shapes only).
MODELS: tuple[tuple[str, str], ...] = (("cnn", "cnn"), ("resnet18", "resnet18"))
HISTORY = 10


def _cuda_time_ms(fn: Callable[[], Any], *, inner: int, repeats: int) -> list[float]:
    """Per-call milliseconds of ``fn``, ``repeats`` samples of ``inner`` calls (CUDA events)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(inner):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / inner)
    return samples


def two_loop_rows(*, sizes: Sequence[int], repeats: int) -> list[dict[str, Any]]:
    """Loop vs compact form vs same-footprint triad on the GPU, per block size."""
    device = torch.device("cuda")
    rows = []
    for n in sizes:
        curv = filled_curvature(n, HISTORY, dtype=torch.float32, seed=11, device=device)
        k = int(curv.count)
        g = torch.randn(n, device=device)
        q = g.clone()
        loop = lambda: curv.two_loop_(q.copy_(g))  # noqa: E731
        compact = lambda: curv.apply_inverse_hessian_(q.copy_(g))  # noqa: E731
        fn = max(1, ((2 * k + 1) * n) // 3)
        fa, fb, fc = (torch.zeros(fn, device=device), torch.rand(fn, device=device),
                      torch.rand(fn, device=device))
        triad = lambda: torch.add(fb, fc, alpha=3.0, out=fa)  # noqa: E731
        for f in (loop, compact, triad):
            f()
        torch.cuda.synchronize()
        probe = min(_cuda_time_ms(loop, inner=3, repeats=2))
        inner = max(3, int(20.0 / max(probe, 1e-3)))  # ~20 ms per sample
        loop_ms = _cuda_time_ms(loop, inner=inner, repeats=repeats)
        compact_ms = _cuda_time_ms(compact, inner=inner, repeats=repeats)
        triad_ms = _cuda_time_ms(triad, inner=inner, repeats=repeats)
        loop_bytes = (10 * k + 4) * n * BYTES_F32
        triad_bytes = 3 * fn * BYTES_F32
        triad_gbps = [triad_bytes / (t * 1e-3) / 1e9 for t in triad_ms]
        loop_gbps = [loop_bytes / (t * 1e-3) / 1e9 for t in loop_ms]
        row = {
            "n": n, "history": HISTORY, "pairs": k, "inner_calls": inner,
            "loop_ms": common.summarize(loop_ms), "compact_ms": common.summarize(compact_ms),
            "triad_footprint_ms": common.summarize(triad_ms),
            "loop_gbps": common.summarize(loop_gbps),
            "triad_footprint_gbps": common.summarize(triad_gbps),
            "loop_fraction_of_triad": common.summarize(
                lg / tg for lg, tg in zip(loop_gbps, triad_gbps)),
            "compact_speedup": common.summarize(lt / ct for lt, ct in zip(loop_ms, compact_ms)),
            "loop_kernels_per_call": 6 * k + 2,  # copy, 3 per pair per loop, scale
        }
        rows.append(row)
        logger.info("two-loop n=%9d: loop %.3f ms (%.0f GB/s, %.2f of triad), compact %.3f ms "
                    "(x%.2f)", n, row["loop_ms"]["median"], row["loop_gbps"]["median"],
                    row["loop_fraction_of_triad"]["median"], row["compact_ms"]["median"],
                    row["compact_speedup"]["median"])
        del curv, g, q, fa, fb, fc
        torch.cuda.empty_cache()
    return rows


def summary_markdown(res: dict[str, Any]) -> str:
    lines = [f"# GPU benchmark ({res['gpu']}, torch {res['torch']})", "",
             f"Command: `{res['command']}`; {res['started']}.", "",
             "## Whole iteration over SGD-momentum (median [IQR] over windows of T steps)", "",
             "| model | params | blocks | SGD ms | mL-BFGS ms | mL-BFGS / SGD | Adam / SGD "
             "| mL-BFGS step ms | H·g ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cfg in res["iteration"]:
        it, ratio, bd = cfg["iteration_ms"], cfg["ratio_to_sgd"], cfg["breakdown_ms_per_step"]
        lines.append(
            f"| {cfg['label']} | {cfg['parameters']:,} | {cfg['blocks']} | "
            f"{it['sgd']['median']:.2f} | {it['mlbfgs']['median']:.2f} | "
            f"{common.fmt_stat(ratio['mlbfgs'])} | "
            f"{common.fmt_stat(ratio['adam']) if 'adam' in ratio else '–'} | "
            f"{bd['step total']['median']:.2f} | {bd['H·g']['median']:.2f} |")
    lines += ["", "## H·g on one block (history 10, float32): two-loop vs compact form", "",
              "| n | loop ms | loop GB/s | fraction of same-footprint triad | compact ms "
              "| compact speed-up | kernels per loop call |",
              "|---|---|---|---|---|---|---|"]
    for r in res["two_loop"]:
        lines.append(
            f"| {r['n']:.0e} | {r['loop_ms']['median']:.3f} | {r['loop_gbps']['median']:.0f} "
            f"| {common.fmt_stat(r['loop_fraction_of_triad'])} | "
            f"{r['compact_ms']['median']:.3f} | {common.fmt_stat(r['compact_speedup'])} | "
            f"{r['loop_kernels_per_call']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.bench gpu",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="bench-gpu", help="output directory")
    p.add_argument("--quick", action="store_true", help="fewer repeats, T = 10")
    p.add_argument("--data-root", default=None,
                   help="Fashion-MNIST idx.gz directory (default: the Debian package's); "
                        "without the files the synthetic set is used")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("mlbfgs_hpc").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        logger.error("no CUDA device: this benchmark needs a GPU")
        return 2
    from mlbfgs_hpc.data import FASHION_MNIST_ROOT

    root = Path(args.data_root or FASHION_MNIST_ROOT)
    dataset = "fashion-mnist" if (root / "train-images-idx3-ubyte.gz").is_file() else "synthetic"
    extra = ("--device", "cuda", *(("--data-root", str(root)) if dataset != "synthetic" else ()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {
        "command": " ".join(["python", "-m", "tools.bench", "gpu",
                             *(argv if argv is not None else sys.argv[1:])]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "dataset": dataset,
    }
    res["iteration"] = [
        bench_overhead.measure_config(f"{label}/{dataset}", model, dataset, threads=4,
                                      repeats=5 if args.quick else 10,
                                      period=10 if args.quick else 50,
                                      optimizers=("mlbfgs", "sgd", "adam"), extra_args=extra)
        for label, model in MODELS]
    sizes = (10**5, 10**6, 10**7) if args.quick else (10**4, 10**5, 10**6, 10**7, 3 * 10**7)
    res["two_loop"] = two_loop_rows(sizes=sizes, repeats=5 if args.quick else 10)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str), encoding="utf-8")
    (out / "summary.md").write_text(summary_markdown(res), encoding="utf-8")
    print(summary_markdown(res))  # noqa: T201 - the command's report
    return 0


if __name__ == "__main__":
    sys.exit(main())
