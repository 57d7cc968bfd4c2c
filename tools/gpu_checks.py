"""``python3 tools/gpu_checks.py --out DIR``: the checks this project can only make on a GPU,
in one command, for a session that is lent one for a few minutes.

What it runs, each under its own timeout, continuing past a failure (issue 12's and 13's GPU
items; BENCHMARKS.md §7 has the last GPU figures):

1. ``env``: torch, CUDA and the GPU's name.
2. ``cuda-tests``: ``tests/test_device.py`` and ``tests/test_batched.py`` (their CUDA cases
   are skipped on a CPU machine: the GPU path against the CPU run, bitwise resume on CUDA).
3. ``iteration``: ``python -m tools.bench gpu`` (whole iteration over SGD-momentum, CNN and
   ResNet-18; issue 12's target is ≤ 1.15 on ResNet-18).
4. ``direct``: ``python -m tools.bench batched --direct-sizes …`` on the GPU: whether the
   direct (GEMV) path that CPUs use for big blocks is faster there too
   (``direct_min_numel_for`` keeps it off on GPUs until this is measured).
5. ``batched``: ``python -m tools.bench batched`` on the GPU: per-block against batched H·g.
6. ``default-run``: the embedded default run (``mlbfgs-train`` with no options) on the GPU,
   seeds 0, 1 and 2 side by side: final and best test accuracy (issue 13's ≥ 89.5 % and
   within 0.3 points of the best evaluation).
7. ``lr-bar``: the same run at ½× and 2× the default lr (0.05 and 0.2), the same seeds, side
   by side: issue 13's stability bar (no run ends more than 0.5 points below its best
   evaluation) on the GPU, for the CNN task (the default run's 1× is section 6).

Not here: Horovod built with NCCL (``tools/bootstrap.sh``) needs its sdist carried to the
machine and a build of several minutes; it is left to a run of its own, on a machine with two
GPUs or more: NCCL 2.5 and later refuse two ranks on one device ("Duplicate GPU detected",
NVIDIA/nccl#418), so a one-GPU machine cannot run a 2-rank NCCL test.

The GPU machine's image has torch but not this project's virtual environment: run this with
the image's ``python3`` from the repository root (the package is imported from the checkout),
with the Fashion-MNIST files carried along (``--data-root``). ``--device cpu --quick`` runs
the same plumbing on a CPU machine in a few minutes (the GPU sections then report their
skips and the benchmark's "no GPU" exit), which is how this script is tested.

Writes into ``--out``: ``summary.md``, ``gpu_checks.json``, ``sections.log`` and the
benchmarks' own files (seven files, two folders deep at most: what a lent machine sends back).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DIRECT_SIZES = ("131072", "401536", "1048576", "2359296")
SECTIONS = ("env", "cuda-tests", "iteration", "direct", "batched", "default-run", "lr-bar")
#: ½× and 2× the default lr (mlbfgs_hpc.options.DEFAULT_LR for the CNN: 0.1).
LR_BAR = ("0.05", "0.2")


def _child_env() -> dict[str, str]:
    """The environment of every child: unbuffered, so a timed-out one leaves its output."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _text(data: str | bytes | None) -> str:
    """Output captured by ``subprocess`` (bytes when a timeout cut it off)."""
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def _run(name: str, argv: Sequence[str], *, timeout: int, log: Path) -> dict[str, Any]:
    """Run one section; its output goes to ``log``; return rc, seconds and the last lines."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(list(argv), cwd=REPO, capture_output=True, text=True,
                              timeout=timeout, check=False, env=_child_env())
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        out = f"{_text(exc.stdout)}{_text(exc.stderr)}\n[timed out after {timeout} s]"
    seconds = time.perf_counter() - start
    with log.open("a", encoding="utf-8") as f:
        f.write(f"\n===== {name}: rc {rc}, {seconds:.1f} s\n$ {' '.join(argv)}\n{out}")
    return {"rc": rc, "seconds": round(seconds, 1), "tail": out.strip().splitlines()[-5:]}


def _training_runs(runs: dict[str, list[str]], *, python: str, device: str, quick: bool,
                   data_root: str | None, timeout: int, log: Path) -> dict[str, Any]:
    """The default run with each ``runs[label]``'s extra options, all side by side; final
    and best test accuracy per run."""
    extra = ["--steps", "30", "--eval-every", "10"] if quick else ["--eval-every", "117"]
    if data_root:
        extra += ["--data-root", data_root]
    threads = str(max(1, (os.cpu_count() or 1) // len(runs)))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-checks-") as tmp:
        procs = {}
        start = time.perf_counter()
        for label, options in runs.items():
            argv = [python, "-m", "mlbfgs_hpc", "--device", device, "--threads", threads,
                    "--run-dir", f"{tmp}/{label}", *options, *extra]
            # Each run writes to its own file: pipes read one after the other would stall a
            # run whose output filled its pipe while an earlier one was still being read.
            with open(f"{tmp}/{label}.out", "w", encoding="utf-8") as sink:
                procs[label] = (argv, subprocess.Popen(argv, cwd=REPO, stdout=sink,
                                                       stderr=subprocess.STDOUT,
                                                       env=_child_env()))
        for label, (argv, proc) in procs.items():
            try:
                rc = proc.wait(timeout=max(1.0, timeout - (time.perf_counter() - start)))
                note = ""
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                rc, note = 124, "\n[timed out]"
            out = Path(f"{tmp}/{label}.out").read_text(encoding="utf-8", errors="replace")
            with log.open("a", encoding="utf-8") as f:
                f.write(f"\n===== run {label}: rc {rc}\n$ {' '.join(argv)}\n{out}{note}")
            evals = []
            metrics = Path(tmp) / label / "metrics.jsonl"
            if metrics.is_file():
                records = [json.loads(line) for line in metrics.read_text().splitlines()
                           if line.strip()]
                evals = [100 * r["test_accuracy"] for r in records if r.get("event") == "eval"]
            results[label] = {
                "rc": rc, "final": evals[-1] if evals else None,
                "best": max(evals) if evals else None,
                "drop": (max(evals) - evals[-1]) if evals else None, "evals": evals}
    return results


def _summary(res: dict[str, Any]) -> str:
    lines = [f"# GPU checks ({res['started']}, device {res['device']})", "",
             "| section | rc | seconds | last line |", "|---|---|---|---|"]
    for name, sec in res["sections"].items():
        last = sec["tail"][-1] if sec["tail"] else ""
        lines.append(f"| {name} | {sec['rc']} | {sec['seconds']} | {last[:120]} |")
    lines += ["", "| training run | rc | final % | best % | drop (points) |",
              "|---|---|---|---|---|"]
    for label, run in res["runs"].items():
        fmt = (lambda v: "–" if v is None else f"{v:.2f}")
        lines.append(f"| {label} | {run['rc']} | {fmt(run['final'])} | {fmt(run['best'])} | "
                     f"{fmt(run['drop'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 tools/gpu_checks.py",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to test the plumbing")
    p.add_argument("--quick", action="store_true",
                   help="short runs (the benchmark's --quick, 30 training steps)")
    p.add_argument("--data-root", default=None,
                   help="Fashion-MNIST idx.gz directory (default: the package's)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help="comma-separated subset of the sections")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="seeds of the training runs (all run side by side)")
    args = p.parse_args(argv)
    only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "sections.log"
    log.write_text("", encoding="utf-8")
    py, quick = sys.executable, (["--quick"] if args.quick else [])
    data = ["--data-root", args.data_root] if args.data_root else []
    repeats = ["--repeats", "3"] if args.quick else []
    res: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "device": args.device, "sections": {}, "runs": {}}
    sections = [
        ("env", [py, "-c", "import torch; print(torch.__version__, torch.version.cuda, "
                 "torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"],
         60),
        ("cuda-tests", [py, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        "tests/test_device.py", "tests/test_batched.py"], 300),
        ("iteration", [py, "-m", "tools.bench", "gpu", "--out", str(out / "bench-gpu"),
                       *quick, *data], 300),
        ("direct", [py, "-m", "tools.bench", "batched", "--device", args.device,
                    "--direct-sizes", *DIRECT_SIZES, *repeats,
                    "--json", str(out / "direct.json")], 180),
        ("batched", [py, "-m", "tools.bench", "batched", "--device", args.device, *repeats,
                     "--json", str(out / "batched.json")], 180),
    ]
    for name, cmd, timeout in sections:
        if name in only:
            res["sections"][name] = _run(name, cmd, timeout=timeout, log=log)
    runs = {}
    if "default-run" in only:
        runs.update({f"default-seed{seed}": ["--seed", str(seed)] for seed in args.seeds})
    if "lr-bar" in only:
        runs.update({f"lr{lr}-seed{seed}": ["--seed", str(seed), "--lr", lr]
                     for lr in LR_BAR for seed in args.seeds})
    if runs:
        res["runs"] = _training_runs(runs, python=py, device=args.device, quick=args.quick,
                                     data_root=args.data_root, timeout=420, log=log)
    (out / "gpu_checks.json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    summary = _summary(res)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    sys.stdout.write(summary)
    failed = [n for n, sec in res["sections"].items() if sec["rc"] != 0]
    failed += [label for label, run in res["runs"].items() if run["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
