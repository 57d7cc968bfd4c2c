"""Scaling over ranks: per-rank optimizer memory and step time against the ideal 1/p, and the
two gradient backends (Horovod's fused allreduce vs one flat mpi4py ``Allreduce``).

Launches :mod:`scaling_worker` with ``mpirun -np p`` (plain ``python`` for p = 1, the
embedded single-process path), every launch under ``timeout`` (a stalled Horovod job must not
hang the harness). Rank counts beyond the machine's cores are oversubscribed: on a 2-core
machine p = 4 is a *functional* point (it shows the memory split and that it runs), not a
speed measurement. Every configuration is launched ``repeats`` times, interleaved; step-level
medians pool the timed steps of all repeats and of all ranks' maxima (a step is as slow as
its slowest rank).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from . import common

logger = logging.getLogger(__name__)

#: (ranks, gradient backend); p = 1 runs without a launcher.
CONFIGS: tuple[tuple[int, str], ...] = (
    (1, "local"), (2, "horovod"), (2, "mpi"), (4, "horovod"), (4, "mpi"))


def launch(ranks: int, backend: str, out: Path, *, timed_steps: int,
           timeout: float) -> dict[str, Any]:
    """One launch; returns the worker's JSON (or an ``error`` entry)."""
    cmd = common.module_command("scaling_worker", "--out", str(out), "--timed-steps",
                                str(timed_steps), "--backend",
                                "horovod" if backend == "local" else backend)
    if ranks > 1:
        mpirun = shutil.which("mpirun")
        if mpirun is None:
            return {"error": "mpirun not found"}
        timeout_bin = shutil.which("timeout")
        cmd = [mpirun, "-np", str(ranks), *cmd]
        if timeout_bin:  # belt and braces: the subprocess timeout below also applies
            cmd = [timeout_bin, "--kill-after=10", str(int(timeout)), *cmd]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, env=common.mpi_env(), capture_output=True, text=True,
                              timeout=timeout + 30, cwd=common.REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s: {' '.join(cmd)}"}
    if proc.returncode != 0 or not out.is_file():
        return {"error": f"exit {proc.returncode}: {proc.stderr[-1500:]}"}
    data = json.loads(out.read_text(encoding="utf-8"))
    data["launch_seconds"] = time.monotonic() - start
    return data


def run(*, quick: bool, out_dir: Path, timeout: float = 300.0) -> dict[str, Any]:
    """All configurations, ``repeats`` launches each, interleaved; per-config summaries."""
    repeats = 1 if quick else 2
    timed_steps = 10 if quick else 30
    start = time.monotonic()
    raw: dict[str, list[dict[str, Any]]] = {}
    for rep in range(repeats):
        for ranks, backend in CONFIGS:
            key = f"{ranks}-{backend}"
            result = launch(ranks, backend, out_dir / f"{key}-r{rep}.json",
                            timed_steps=timed_steps, timeout=timeout)
            if "error" in result:
                logger.warning("scaling %s: %s", key, result["error"])
            raw.setdefault(key, []).append(result)
    summaries = []
    base: dict[str, Any] | None = None
    for ranks, backend in CONFIGS:
        key = f"{ranks}-{backend}"
        ok = [r for r in raw[key] if "error" not in r]
        if not ok:
            summaries.append({"ranks": ranks, "backend": backend,
                              "error": raw[key][0].get("error")})
            continue
        s = _summarize(ranks, backend, ok)
        if ranks == 1:
            base = s
        summaries.append(s)
    if base is not None:
        for s in summaries:
            if "error" in s:
                continue
            p = s["ranks"]
            s["ideal_state_bytes"] = base["state_bytes_max"] / p
            s["state_over_ideal"] = s["state_bytes_max"] / (base["state_bytes_max"] / p)
            # Per-rank history+buffers without the replicated full update vector.
            s["sharded_state_over_ideal"] = (
                (s["state_bytes_max"] - s["update_vector_bytes"])
                / ((base["state_bytes_max"] - base["update_vector_bytes"]) / p))
            s["local_step_over_ideal"] = s["local_ms"]["median"] / (
                base["local_ms"]["median"] / p)
    return {"configs": summaries, "repeats": repeats, "timed_steps": timed_steps,
            "cores": os.cpu_count(), "seconds": time.monotonic() - start,
            "raw": {k: [_without_samples(r) for r in v] for k, v in raw.items()}}


def _without_samples(run: dict[str, Any]) -> dict[str, Any]:
    """A launch's record without the per-step samples (they are summarised instead)."""
    out = {k: v for k, v in run.items() if k != "ranks"}
    out["ranks"] = [{k: v for k, v in rank.items() if k != "samples_s"}
                    for rank in run.get("ranks", [])]
    return out


def _summarize(ranks: int, backend: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: the slowest rank's value of each piece; pooled over repeats."""
    pieces = ("iteration", "fwd_bwd", "step", "local", "grad_reduce", "allgatherv",
              "scalar_allgather")
    pooled: dict[str, list[float]] = {p: [] for p in pieces}
    for run in runs:
        per_rank = run["ranks"]
        n_steps = len(per_rank[0]["samples_s"]["step"])
        for i in range(n_steps):
            for p in pieces:
                pooled[p].append(1e3 * max(r["samples_s"].get(p, [0.0] * n_steps)[i]
                                           for r in per_rank))
    first = runs[0]["ranks"]
    return {
        "ranks": ranks, "backend": backend,
        "total_numel": first[0]["total_numel"],
        "owned_numel": [r["owned_numel"] for r in first],
        "owned_blocks": [r["owned_blocks"] for r in first],
        "state_bytes": [r["state_bytes"] for r in first],
        "state_bytes_max": max(r["state_bytes"] for r in first),
        "update_vector_bytes": first[0]["update_vector_bytes"],
        "accepted_pairs": first[0]["accepted_pairs"],
        **{f"{p}_ms": common.summarize(v) for p, v in pooled.items()},
        "comm_share_of_step": common.summarize(
            (a + b + c) / s for a, b, c, s in zip(pooled["grad_reduce"], pooled["allgatherv"],
                                                   pooled["scalar_allgather"], pooled["step"])
            if s > 0),
        "launch_seconds": statistics.median(r["launch_seconds"] for r in runs),
    }


def plot(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Per-rank state and per-step time pieces against p, with the ideal 1/p."""
    plt = common.use_agg_backend()
    rows = [s for s in result["configs"] if "error" not in s]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 3.8), dpi=90)
    base = next((s for s in rows if s["ranks"] == 1), None)
    ax = axes[0]
    for backend, marker in (("horovod", "o"), ("mpi", "s")):
        pts = sorted((s["ranks"], s["state_bytes_max"] / 2**20) for s in rows
                     if s["backend"] in (backend, "local"))
        ax.plot(*zip(*pts), marker=marker, label=f"measured ({backend})")
    if base:
        ps = sorted({s["ranks"] for s in rows})
        ax.plot(ps, [base["state_bytes_max"] / 2**20 / p for p in ps], "k--", lw=1,
                label="ideal 1/p")
    ax.set_xlabel("ranks p")
    ax.set_ylabel("optimizer state per rank (MiB, max over ranks)")
    ax.set_xticks(sorted({s["ranks"] for s in rows}))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    labels = [f"p={s['ranks']}\n{s['backend']}" for s in rows]
    bottoms = [0.0] * len(rows)
    for piece, name in (("fwd_bwd", "fwd+bwd"), ("local", "optimizer (local)"),
                        ("grad_reduce", "grad allreduce wait"),
                        ("allgatherv", "Allgatherv"), ("scalar_allgather", "scalar allgather")):
        vals = [s[f"{piece}_ms"]["median"] for s in rows]
        ax.bar(labels, vals, bottom=bottoms, label=name)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("ms per step (median, slowest rank)")
    ax.legend(fontsize=7)
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title(f"{result['cores']} cores: p > cores is oversubscribed", fontsize=9)
    fig.tight_layout()
    path = out_dir / "scaling.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
