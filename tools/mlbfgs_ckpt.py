"""``mlbfgs-ckpt``: list, inspect, verify, diff and export mlbfgs-hpc checkpoints.

::

    mlbfgs-ckpt ls RUN_DIR                 checkpoints: step, world size, size, valid or not
    mlbfgs-ckpt show CKPT [--json]         configuration, block table, per-block history stats
    mlbfgs-ckpt verify RUN_DIR             every checkpoint of the run (and which one a resume
                                           would use); exit 1 if any is damaged
    mlbfgs-ckpt verify CKPT | FILE.h5      one checkpoint, or one shard file
    mlbfgs-ckpt diff A B [--atol X] [--rtol Y] [--rng]
                                           exit 0 when the training state matches (bitwise
                                           by default); run metadata is shown apart
    mlbfgs-ckpt export CKPT OUT.pt         model weights as a plain torch state dict

Wherever ``CKPT`` is taken (``show``, ``diff``, ``export``), a run directory works too and means
its newest valid checkpoint; ``verify`` on a run directory checks every checkpoint.
Exit codes: 0 success, 1 a problem or difference was found, 2 the input could not be read.
This is a command line tool, so it prints to stdout; everything it reads goes through
:mod:`mlbfgs_hpc.checkpoint` (the only place that touches HDF5).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mlbfgs_hpc.checkpoint import (
    CheckpointError,
    checkpoint_summary,
    compare_checkpoints,
    is_checkpoint_dir,
    list_checkpoints,
    model_state_dict,
    resolve_checkpoint,
    verify_checkpoint,
    verify_file,
    verify_run,
)

logger = logging.getLogger(__name__)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _plain(value: Any) -> Any:
    """JSON-printable form: small tensors as lists, big ones as a dtype/shape note."""
    if isinstance(value, torch.Tensor):
        if value.numel() <= 8:
            return value.tolist()
        return f"<tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}>"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _fmt(value: float | None, spec: str = ".4g") -> str:
    return "-" if value is None else format(value, spec)


# ---- subcommands ---------------------------------------------------------------------------
def cmd_ls(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        print(f"mlbfgs-ckpt: error: {directory} is not a directory", file=sys.stderr)
        return 2
    infos = list_checkpoints(directory, check=not args.no_verify, include_incomplete=True)
    if not infos:
        print(f"no checkpoints under {directory}")
        return 0
    rows = [("NAME", "STEP", "WORLD", "SIZE", "STATUS")]
    for info in infos:
        status = ("incomplete" if not info.complete else "unchecked" if info.valid is None
                  else "valid" if info.valid else "INVALID")
        if info.latest:
            status += " (latest)"
        rows.append((info.path.name, str(info.step), "-" if info.world_size is None
                     else str(info.world_size), _size(info.bytes), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for info in infos:
        for problem in info.problems if info.complete else ():
            print(f"  {info.path.name}: {problem}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    summary = checkpoint_summary(args.ckpt)
    if args.json:
        print(json.dumps(_plain({k: v for k, v in summary.items()}), indent=1))
        return 0
    manifest = summary["manifest"]
    opt = manifest["optimizer"]
    print(f"checkpoint   {summary['path']}")
    print(f"step         {manifest['step']}")
    print(f"world size   {manifest['world_size']}  (hosts: "
          f"{', '.join(sorted({s['host'] for s in manifest['shards']}))})")
    print(f"size         {_size(summary['bytes'])} in {len(manifest['files'])} files")
    print(f"created      {manifest.get('created', '-')}")
    print("versions     " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    print(f"optimizer    {opt['class']}")
    print(f"scheduler    {manifest.get('scheduler') or '-'}")
    print(f"extra        {json.dumps(manifest.get('extra', {}))}")
    print("run config   " + (json.dumps(manifest.get("config", {}), indent=1)
                             .replace("\n", "\n             ")))
    n_params = sum(math.prod(e["shape"]) for e in manifest["model"] if e["kind"] == "parameter")
    print(f"model        {len(manifest['model'])} entries, {n_params} parameters")
    state = summary["optimizer_state"]
    if opt["kind"] == "mlbfgs":
        print("mL-BFGS      " + ", ".join(f"{k}={v}" for k, v in opt.get("config", {}).items()))
        counters = {k: _plain(v) for k, v in state.get("global", {}).items()}
        print("counters     " + ", ".join(f"{k}={v}" for k, v in counters.items()))
        for i, group in enumerate(state.get("param_groups", [])):
            print(f"param group  {i}: " + ", ".join(
                f"{k}={v}" for k, v in group.items() if k != "params"))
        header = ("BLOCK", "NAME", "NUMEL", "RANK", "SHARD", "HIST", "RHO MIN", "RHO MAX",
                  "GAMMA", "ACC", "REJ")
        rows = [header] + [(
            str(b["index"]), b["name"], str(b["numel"]), str(b["rank"]), b["shard"],
            f"{b['count']}/{b['history_size']}", _fmt(b["rho_min"]), _fmt(b["rho_max"]),
            _fmt(b["gamma"]), str(b["accepted"]), str(b["rejected"]))
            for b in summary["blocks"]]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        print()
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        print()
        for b in summary["blocks"]:
            print(f"block {b['index']} params: {', '.join(b['params'])}")
    else:
        for i, group in enumerate(state.get("param_groups", [])):
            print(f"param group  {i}: " + ", ".join(
                f"{k}={_plain(v)}" for k, v in group.items() if k != "params"))
        per_param = state.get("state", {})
        print(f"state        {len(per_param)} parameters with state")
        for key, value in list(per_param.items())[:20]:
            print(f"  {key}: {json.dumps(_plain(value))}")
    if summary["scheduler_state"] is not None:
        print(f"scheduler state {json.dumps(_plain(summary['scheduler_state']))}")
    return 0


def _print_problems(header: str, problems: Sequence[str]) -> None:
    print(header)
    for problem in problems:
        print(f"  {problem}")


def cmd_verify(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.is_file():
        problems = verify_file(path)
        if problems:
            _print_problems(f"INVALID: {len(problems)} problem(s) in {path}", problems)
            return 1
        alone = not (path.parent / "manifest.json").exists()
        print(f"OK {path}: every dataset's fletcher32 checksum checks out" + (
            " (no manifest beside it: size, sha256 and content not checked against one)"
            if alone else "; size, sha256 and content match the manifest"))
        return 0
    if not path.exists() or is_checkpoint_dir(path) or path.name.startswith(".tmp-"):
        problems = verify_checkpoint(path)
        if problems:
            _print_problems(f"INVALID: {len(problems)} problem(s) in {path}", problems)
            return 1
        print(f"OK {path}: manifest, sha256 digests, fletcher32 checksums and block table "
              f"all check out")
        return 0
    return _verify_run(path)


def _verify_run(run_dir: Path) -> int:
    run = verify_run(run_dir)
    for report in run.checkpoints:
        status = ("incomplete (an interrupted write: resume ignores it, the next checkpoint "
                  "removes it)" if not report.complete else "DAMAGED" if report.problems
                  else "OK")
        print(f"{report.path.name}  step {report.step}  {status}")
        for problem in report.problems if report.complete else ():
            print(f"  {problem}")
    complete = [c for c in run.checkpoints if c.complete]
    if run.resume_from is not None:
        print(f"a resume would use {run.resume_from}")
    if not complete:
        print(f"INVALID: no checkpoints under {run_dir}")
        return 1
    if run.damaged:
        names = ", ".join(c.path.name for c in run.damaged)
        print(f"INVALID: {len(run.damaged)} of {len(complete)} checkpoints damaged ({names})"
              + ("" if run.resume_from else "; none left to resume from"))
        return 1
    print(f"OK: all {len(complete)} checkpoints of {run_dir} check out (manifest, sha256 "
          f"digests, fletcher32 checksums, block table)")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    result = compare_checkpoints(args.a, args.b, atol=args.atol, rtol=args.rtol,
                                 include_rng=args.rng)
    for difference in result.differences:
        print(difference)
    if result.metadata:
        print("run metadata (shown apart: never makes the exit code non-zero):")
        for line in result.metadata:
            print(f"  {line}")
    print(result.summary())
    return 0 if result.identical else 1


def cmd_export(args: argparse.Namespace) -> int:
    state = model_state_dict(args.ckpt)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"wrote {len(state)} tensors from {resolve_checkpoint(args.ckpt)} to {out} "
          f"(load with torch.load(path, weights_only=True))")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlbfgs-ckpt", description="Inspect mlbfgs-hpc checkpoints. CKPT may be a "
        "checkpoint directory or a run directory (its newest valid checkpoint).")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list the checkpoints of a run directory")
    p.add_argument("dir", help="run directory (or its checkpoints/ directory)")
    p.add_argument("--no-verify", action="store_true",
                   help="do not check digests (faster; status shows 'unchecked')")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("show", help="configuration, block table and history statistics")
    p.add_argument("ckpt")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("verify", help="check digests and every dataset of a checkpoint, of "
                       "every checkpoint of a run, or of one shard file; exit 1 on a problem")
    p.add_argument("path", help="a run directory (every checkpoint), a checkpoint directory, "
                   "or one .h5 file of a checkpoint")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("diff", help="compare two checkpoints entry by entry")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--atol", type=float, default=None,
                   help="absolute tolerance for floating values, numpy.allclose semantics: "
                        "|a-b| <= atol + rtol*|b|; given alone, rtol is numpy's 1e-5 "
                        "(default: bitwise)")
    p.add_argument("--rtol", type=float, default=None,
                   help="relative tolerance (relative to B); given alone, atol is rtol "
                        "times the entry's largest |b| (float rounding follows the tensor's "
                        "scale), give --atol too for numpy's exact rule (default: bitwise)")
    p.add_argument("--rng", action="store_true", help="also compare per-rank RNG states")
    p.set_defaults(func=cmd_diff)
    p = sub.add_parser("export", help="write the model weights as a torch state dict")
    p.add_argument("ckpt")
    p.add_argument("out", help="output .pt file")
    p.set_defaults(func=cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mlbfgs-ckpt``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="mlbfgs-ckpt: %(message)s")
    try:
        return int(args.func(args))
    except (CheckpointError, ValueError) as exc:
        print(f"mlbfgs-ckpt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
