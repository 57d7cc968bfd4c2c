"""The gradient and update paths of a training step across hosts: bytes on the cable and
iteration time, old path against new, on rate-limited links.

Two measurements, both on a ``tools/netns`` cluster of 2 hosts x 2 ranks:

* ``steps``: the training command itself (``python -m mlbfgs_hpc``, synthetic data), run for
  ``--short`` and ``--long`` steps with the same flags (the old path's, the defaults, and
  ``--grad-reduce reducescatter``); bytes per step per host = the
  difference of each host's ``eth0`` transmit counter between the two runs / the difference
  in steps (start-up, evaluation and checkpoints cancel). This is how issue 11 measured the
  old path (2.36x the model for the small CNN).
* ``alternate``: one ``mpirun`` job per model whose ranks train with every path in turn,
  ``--segment`` steps each, for ``--rounds`` rounds (order reversed every other round, so a
  drift in the machine's load hits all paths alike). Per segment: the median step time on
  rank 0 and every host's ``eth0`` bytes per step. Ratios against the old path are taken
  within a round, then summarised (median, min-max) over rounds.

The paths (``--grad-backend``, ``--grad-reduce``, ``--node-aware`` of ``mlbfgs-train``):

==================  ====================================================================
``hvd-ar-flat``     Horovod allreduce + flat ``Allgatherv``: the path before issue 11
``hvd-ar-nodeag``   Horovod allreduce + node-aware ``Allgatherv`` (the update alone): the
                    defaults (it measured faster than ``hvd-rs-node``, BENCHMARKS.md)
``hvd-rs-flat``     Horovod ``alltoall`` to each owner from the backward hooks + flat
                    ``Allgatherv``
``hvd-rs-node``     Horovod intra-host allreduce, leaders' ``alltoall`` per owner from
                    the backward hooks, node-aware ``Allgatherv``: the "new" path,
                    ``--grad-reduce reducescatter``
``hvd-rs-flat-after``  Horovod padded ``reducescatter`` after the backward pass + flat
                    ``Allgatherv`` (``grad_overlap=False``)
``hvd-rs-node-after``  Horovod intra-host allreduce, leaders' ``Reduce_scatter`` after the
                    backward pass, node-aware ``Allgatherv`` (``grad_overlap=False``)
``mpi-ar-flat``     mpi4py ``Allreduce`` + flat ``Allgatherv``
``mpi-rs-flat``     mpi4py ``Reduce_scatter`` (ownership counts) + flat ``Allgatherv``
``mpi-rs-node``     mpi4py node-aware reduce-scatter + node-aware ``Allgatherv``
==================  ====================================================================

Usage (root; builds and removes its own cluster)::

    python -m tools.bench netpaths [--models cnn resnet18] [--rates none 1gbit] \\
        [--rounds 3] [--segment 6] [--json out.json] [--markdown out.md]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import common

logger = logging.getLogger(__name__)

#: name: (grad backend, grad reduce, node-aware flag value, Horovod reduce-scatter from the
#: backward hooks)
PATHS: dict[str, tuple[str, str, str, bool]] = {
    "hvd-ar-flat": ("horovod", "allreduce", "off", True),
    "hvd-ar-nodeag": ("horovod", "allreduce", "on", True),
    "hvd-rs-flat": ("horovod", "reducescatter", "off", True),
    "hvd-rs-node": ("horovod", "reducescatter", "auto", True),
    "hvd-rs-flat-after": ("horovod", "reducescatter", "off", False),
    "hvd-rs-node-after": ("horovod", "reducescatter", "auto", False),
    "mpi-ar-flat": ("mpi", "allreduce", "off", True),
    "mpi-rs-flat": ("mpi", "reducescatter", "off", True),
    "mpi-rs-node": ("mpi", "reducescatter", "auto", True),
}
OLD, NEW = "hvd-ar-flat", "hvd-rs-node"
#: Models of the worker: name -> (build_model name, options). ``mlp-wide``: 10.8 M
#: parameters with little compute (the network dominates even on shared cores).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("cnn", {}), "resnet18": ("resnet18", {}),
    "mlp-wide": ("mlp", {"hidden_sizes": (4096, 2048, 1024)}),
}
IN_SHAPE = (1, 8, 8)  # the synthetic dataset's images
GLOBAL_BATCH = 128
_TIMEOUT_S = 1800


# ---- worker: every path in turn, under mpirun ---------------------------------------------------
def worker(model_name: str, *, paths: Sequence[str], rounds: int, segment: int, warmup: int,
           out: Path) -> None:
    """Train ``model_name`` with each path for ``segment`` timed steps, ``rounds`` times."""
    import torch
    import torch.nn.functional as F

    from mlbfgs_hpc import MLBFGS, build_blocks, init_communicator
    from mlbfgs_hpc.models import build_model

    torch.set_num_threads(1)
    comm = init_communicator()
    torch.manual_seed(0)
    arch, options = MODELS[model_name]
    model = build_model(arch, in_shape=IN_SHAPE, num_classes=10, **options)
    numel = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(comm.rank)
    x = torch.randn(GLOBAL_BATCH // comm.size, *IN_SHAPE, generator=gen)
    y = torch.randint(0, 10, (x.shape[0],), generator=gen)
    records = []
    for rnd in range(rounds):
        for name in (paths if rnd % 2 == 0 else list(reversed(paths))):
            backend, reduce, node, overlap = PATHS[name]
            optimizer = MLBFGS(model.parameters(), blocks=build_blocks(model), lr=0.01,
                               comm=comm, grad_backend=backend, grad_reduce=reduce,
                               node_aware={"auto": None, "on": True, "off": False}[node],
                               grad_overlap=overlap)
            times: list[float] = []
            for step in range(warmup + segment):
                if step == warmup:
                    comm.barrier()
                    tx0 = common.eth0_tx_bytes() if comm.local_rank == 0 else 0
                start = time.perf_counter()
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                times.append(time.perf_counter() - start)
            comm.barrier()
            sent = (common.eth0_tx_bytes() - tx0) if comm.local_rank == 0 else None
            early = (optimizer._reducer.runs_sent_during_backward
                     if optimizer._reducer is not None else None)
            per_host = [s / segment for s in comm.allgather_object(sent) if s is not None]
            if optimizer._reducer is not None:
                optimizer._reducer.remove_hooks()
            timed = times[warmup:]
            records.append({
                "model": model_name, "params": numel, "round": rnd, "path": name,
                "node_aware": optimizer.node_aware, "step_s": statistics.median(timed),
                "gradient_path": (optimizer._reducer.path if optimizer._reducer is not None
                                  else None),
                "step_times": timed, "bytes_per_step_per_host": per_host,
                "runs_sent_during_backward": early})
            if comm.rank == 0:
                logger.info("%s round %d %s: %.3f s/step, %s B/step/host, runs sent during "
                            "the backward pass (rank 0, last step): %s", model_name, rnd,
                            name, records[-1]["step_s"], [round(b) for b in per_host], early)
    if comm.rank == 0:
        out.write_text("".join(json.dumps(r) + "\n" for r in records))


# ---- driver ------------------------------------------------------------------------------------
def _launch(cluster: Any, cmd: list[str], *, timeout: float = _TIMEOUT_S) -> None:
    argv = cluster.mpirun_cmd(4, cmd, forward=["PYTHONPATH"], timeout_s=timeout - 30)
    proc = subprocess.run(argv, env=common.mpi_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])}... failed (rc={proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def run_alternate(cluster: Any, *, model: str, paths: Sequence[str], rounds: int,
                  segment: int, warmup: int) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="bench-netpaths-") as tmp:
        out = Path(tmp) / "records.jsonl"
        _launch(cluster, common.module_command(
            "netpaths", "worker", "--out", str(out), "--models", model, "--paths", *paths,
            "--rounds", str(rounds), "--segment", str(segment), "--warmup", str(warmup)))
        return [json.loads(line) for line in out.read_text().splitlines()]


def run_steps(cluster: Any, *, model: str, flags: Sequence[str], short: int,
              long: int) -> dict[str, Any]:
    """Bytes per step per host of the training command, from a short and a long run."""
    sent: dict[int, list[int]] = {}
    seconds: dict[int, float] = {}
    for steps in (short, long):
        with tempfile.TemporaryDirectory(prefix="bench-netpaths-run-") as tmp:
            before = [cluster.net_bytes(h.index)["tx_bytes"] for h in cluster.hosts]
            start = time.monotonic()
            _launch(cluster, [sys.executable, "-m", "mlbfgs_hpc", "--model", model,
                              "--dataset", "synthetic", "--threads", "1", "--quiet",
                              "--steps", str(steps), "--resume", "never",
                              "--run-dir", str(Path(tmp) / "run"), *flags])
            seconds[steps] = time.monotonic() - start
            sent[steps] = [cluster.net_bytes(h.index)["tx_bytes"] - b
                           for h, b in zip(cluster.hosts, before)]
    per_host = [(b - a) / (long - short) for a, b in zip(sent[short], sent[long])]
    return {"model": model, "flags": list(flags), "short": short, "long": long,
            "bytes_per_step_per_host": per_host, "run_seconds": seconds}


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, link, path): bytes/step/host and step time, and the ratio of the step time
    to the old path's in the same round (median and min-max over rounds)."""
    rows = []
    keys = sorted({(r["model"], r["link"]) for r in records})
    for model, link in keys:
        mine = [r for r in records if r["model"] == model and r["link"] == link]
        old = {r["round"]: r["step_s"] for r in mine if r["path"] == OLD}
        for name in PATHS:
            sel = [r for r in mine if r["path"] == name]
            if not sel:
                continue
            ratios = [r["step_s"] / old[r["round"]] for r in sel if r["round"] in old]
            model_bytes = 4 * sel[0]["params"]
            host_bytes = [max(r["bytes_per_step_per_host"]) for r in sel]
            rows.append({
                "model": model, "params": sel[0]["params"], "link": link, "path": name,
                "bytes_x_model": statistics.median(host_bytes) / model_bytes,
                "step": common.summarize(r["step_s"] for r in sel),
                "ratio": common.summarize(ratios)})
    return rows


def markdown(rows: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]]) -> str:
    out = ["| model (params) | link | path | bytes/step/host (x model) | step s, median "
           "[min-max] | time / old path, median [min-max] |", "|---|---|---|---|---|---|"
           ] if rows else []
    for r in rows:
        s, q = r["step"], r["ratio"]
        out.append(f"| {r['model']} ({r['params']:,}) | {r['link']} | {r['path']} | "
                   f"{r['bytes_x_model']:.3f} | {s['median']:.3f} [{s['min']:.3f}-"
                   f"{s['max']:.3f}] | {q['median']:.3f} [{q['min']:.3f}-{q['max']:.3f}] |")
    if steps:
        out += [""] * bool(out) + ["| model | flags | bytes/step/host (host 0, host 1), "
                                   "x model |", "|---|---|---|"]
        for s in steps:
            out.append(f"| {s['model']} | `{' '.join(s['flags']) or '(defaults)'}` | "
                       + ", ".join(f"{b / s['model_bytes']:.3f}"
                                   for b in s["bytes_per_step_per_host"]) + " |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.bench netpaths",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("mode", nargs="?", choices=("run", "worker"), default="run")
    p.add_argument("--models", nargs="*", choices=list(MODELS), default=["cnn", "resnet18"],
                   help="models for the alternation (none: skip it)")
    p.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    p.add_argument("--rates", nargs="+", default=["none", "1gbit"],
                   help="link rates to measure the alternation on ('none': unshaped)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--segment", type=int, default=6, help="timed steps per path per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per segment")
    p.add_argument("--steps-models", nargs="*", default=["cnn", "resnet18"],
                   help="models for the training-command byte count (none: skip it)")
    p.add_argument("--short", type=int, default=10)
    p.add_argument("--long", type=int, default=40)
    p.add_argument("--out", default=None, help="worker: where rank 0 writes its records")
    p.add_argument("--json", default=None)
    p.add_argument("--markdown", default=None)
    p.add_argument("--prefix", default="mlbnet")
    args = p.parse_args(argv)
    if args.mode == "worker":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        worker(args.models[0], paths=args.paths, rounds=args.rounds, segment=args.segment,
               warmup=args.warmup, out=Path(args.out))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from .. import netns
    import signal

    for sig in (signal.SIGTERM, signal.SIGHUP):  # so the finally below always runs
        signal.signal(sig, signal.default_int_handler)
    cluster = netns.NetnsCluster(hosts=2, slots=2, prefix=args.prefix).up()
    records: list[dict[str, Any]] = []
    steps: list[dict[str, Any]] = []
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_before = common.load_average()
    try:
        for model in args.steps_models:
            for flags in (["--grad-reduce", "allreduce", "--node-aware", "off"], [],
                          ["--grad-reduce", "reducescatter"]):
                result = run_steps(cluster, model=model, flags=flags, short=args.short,
                                   long=args.long)
                steps.append(result)
                logger.info("steps %s %s: %s B/step/host", model, flags or "(defaults)",
                            [round(b) for b in result["bytes_per_step_per_host"]])
        for rate in args.rates:
            cluster.shape(rate=None if rate == "none" else rate)
            for model in args.models:
                for r in run_alternate(cluster, model=model, paths=args.paths,
                                       rounds=args.rounds, segment=args.segment,
                                       warmup=args.warmup):
                    records.append({**r, "link": rate})
    finally:
        cluster.down()
    sizes = {r["model"]: r["params"] for r in records}
    for s in steps:
        s["model_bytes"] = 4 * sizes.get(s["model"], _params_of(s["model"]))
    rows = summarize(records)
    result = {"started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average_before": load_before, "load_average_after": common.load_average(),
              "machine": common.machine_info(), "records": records, "steps": steps,
              "summary": rows}
    table = markdown(rows, steps)
    sys.stdout.write(table)
    if args.json:
        common.write_json(Path(args.json), result)
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0


def _params_of(model: str) -> int:
    from mlbfgs_hpc.models import build_model

    arch, options = MODELS[model]
    return sum(p.numel() for p in build_model(arch, in_shape=IN_SHAPE, num_classes=10,
                                              **options).parameters())


if __name__ == "__main__":
    sys.exit(main())
