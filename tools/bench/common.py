"""Shared pieces of the benchmarks: statistics, timers, machine facts, result files, and how
a benchmark starts its own processes (``mpirun`` environment, ``python -m`` of a sibling).

Every speed figure the harness reports is a *ratio against a baseline measured in the same
run*, summarised by the median and the spread (quartiles and min/max) over repeats, because
the machines it runs on are often shared and absolute timings drift by tens of percent.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The repository root (``tools/bench/common.py`` -> ``.``): on PYTHONPATH of every process a
#: benchmark starts, so ``mlbfgs_hpc`` and ``tools.bench`` import from this checkout.
REPO = Path(__file__).resolve().parents[2]


def mpi_env(**extra: str) -> dict[str, str]:
    """Environment for ``mpirun`` as root, oversubscribed (ranks yield the CPU while they
    wait, or they starve each other), one thread per rank, this checkout importable."""
    env = dict(os.environ)
    env.update({
        "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1", "OMPI_MCA_mpi_yield_when_idle": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    })
    env.update(extra)
    return env


def eth0_tx_bytes() -> int:
    """Bytes this host has sent on its cable: inside a ``tools/netns`` host ``/sys`` is that
    host's, and ``eth0`` its end of the cable (0 where there is no ``eth0``)."""
    try:
        return int(Path("/sys/class/net/eth0/statistics/tx_bytes").read_text())
    except OSError:
        return 0


def time_collective(comm: Any, fn: Callable[[], None], *,
                    iters: int) -> tuple[list[float], list[float]]:
    """Time ``iters`` calls of a collective ``fn`` on every rank of ``comm`` (an
    ``mlbfgs_hpc`` communicator), each call between barriers.

    Returns:
        Per call, the slowest rank's seconds; per host, the ``eth0`` bytes it sent per call
        (each host counted once, by its local rank 0).
    """
    comm.barrier()
    tx0 = eth0_tx_bytes() if comm.local_rank == 0 else None
    times = []
    for _ in range(iters):
        comm.barrier()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    comm.barrier()
    sent = (eth0_tx_bytes() - tx0) if tx0 is not None else None
    per_host = [s / iters for s in comm.allgather_object(sent) if s is not None]
    return [max(ts) for ts in zip(*comm.allgather_object(times))], per_host


def module_command(name: str, *args: str) -> list[str]:
    """``python -m <this package>.<name> ARGS``: a sibling benchmark module as a process
    (under ``mpirun`` too); works for ``tools.bench`` and the installed
    ``mlbfgs_hpc_tools.bench`` alike."""
    return [sys.executable, "-m", f"{__package__}.{name}", *args]


def summarize(values: Iterable[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of ``values`` (NaN entries are dropped).

    Quartiles use the "inclusive" method (linear interpolation between order statistics), so
    three repeats give q1/q3 halfway between min/median and median/max.
    """
    data = sorted(float(v) for v in values if not math.isnan(float(v)))
    if not data:
        return {"median": math.nan, "q1": math.nan, "q3": math.nan, "min": math.nan,
                "max": math.nan, "n": 0}
    if len(data) == 1:
        q1 = q3 = data[0]
    else:
        q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive")
    return {"median": statistics.median(data), "q1": q1, "q3": q3, "min": data[0],
            "max": data[-1], "n": len(data)}


def stat_columns(source: dict[str, Any], keys: Iterable[str]) -> dict[str, float]:
    """CSV columns ``<key>_median``, ``<key>_q1``, ``<key>_q3`` of the :func:`summarize`
    dicts ``source[key]`` (keys missing from ``source`` are skipped)."""
    return {f"{key}_{part}": source[key][part]
            for key in keys if key in source for part in ("median", "q1", "q3")}


def fmt_stat(stat: dict[str, float], *, digits: int = 3, spread: str = "minmax") -> str:
    """``median [min–max]`` (or, ``spread="iqr"``, ``[q1–q3]``) as text; ``n/a`` when there
    is no value. Min–max by default: the reports' tables say so, and with three seeds the
    quartiles are only halfway points between the median and the extremes."""
    if not stat or stat.get("n", 0) == 0 or math.isnan(stat["median"]):
        return "n/a"
    lo, hi = (stat["q1"], stat["q3"]) if spread == "iqr" else (stat["min"], stat["max"])
    return f"{stat['median']:.{digits}f} [{lo:.{digits}f}–{hi:.{digits}f}]"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (the machine may be shared)."""
    return [round(v, 2) for v in os.getloadavg()]


def _lscpu() -> dict[str, str]:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def _mem_total_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return math.nan


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(module)
    except Exception:  # noqa: BLE001 - any failure simply means "not installed"
        return None


def _mpirun_version() -> str | None:
    try:
        out = subprocess.run(["mpirun", "--version"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0].strip() if out else None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, OS and the versions of everything the numbers depend on."""
    import torch

    cpu = _lscpu()
    return {
        "cpu_model": cpu.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores_per_socket": cpu.get("Core(s) per socket"),
        "threads_per_core": cpu.get("Thread(s) per core"),
        "sockets": cpu.get("Socket(s)"),
        "l2_cache": cpu.get("L2 cache"),
        "l3_cache": cpu.get("L3 cache"),
        "hypervisor": cpu.get("Hypervisor vendor"),
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "numpy": _version("numpy"),
            "mpi4py": _version("mpi4py"),
            "horovod": _version("horovod"),
            "h5py": _version("h5py"),
            "matplotlib": _version("matplotlib"),
            "pytorch-optimizer": _version("pytorch-optimizer"),
            "mlbfgs-hpc": _version("mlbfgs-hpc"),
            "mpirun": _mpirun_version(),
        },
    }


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=_json_default) + "\n", encoding="utf-8")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows of flat dicts as CSV; the header is the union of keys in first-seen order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_cell(row.get(k)) for k in keys})


def _csv_cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return value


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def use_agg_backend() -> Any:
    """matplotlib's pyplot on the non-interactive Agg backend (no display on a cluster)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def add_timer(owner: Any, attr: str, sink: dict[str, float], key: str, *,
              sync: Callable[[], None] | None = None) -> Callable[[], None]:
    """Wrap ``owner.attr`` so each call adds its wall time to ``sink[key]``; return an undo.

    The wrapper is set on the instance, so the class (and other instances) stay untouched.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it
    stops, so asynchronous GPU work is charged to the piece that launched it.
    """
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        if sync is not None:
            sync()
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if sync is not None:
                sync()
            sink[key] += time.perf_counter() - start

    setattr(owner, attr, timed)
    return lambda: delattr(owner, attr) if attr in vars(owner) else None
