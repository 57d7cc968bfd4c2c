"""The command line of the namespace cluster (``python tools/netns_cluster.py``)."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .cluster import NetnsCluster
from .system import DEFAULT_PREFIX, DEMO_PREFIX, ClusterError, teardown_prefix

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netns_cluster.py",
        description="A multi-host MPI test cluster on one machine, built from Linux network "
        "namespaces (see tools/netns/__init__.py)."
    )
    p.add_argument(
        "--prefix", default=None,
        help=f"cluster name prefix (default {DEFAULT_PREFIX}; {DEMO_PREFIX} for demo)",
    )  # fmt: skip
    p.add_argument(
        "--state-dir", default=None, help="state directory (default /tmp/netns-cluster-PREFIX)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log every system command")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="create the cluster")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--slots", type=int, default=2)
    up.add_argument(
        "--scratch", nargs="?", const="/scratch/local", default=None,
        help="node-local tmpfs at this path on every host (default path /scratch/local)",
    )  # fmt: skip
    up.add_argument("--scratch-size", default="256m")
    for sub_parser in (up, shape := sub.add_parser(
            "shape", help="give every cable a rate and/or latency (tc), or none (--off)")):
        sub_parser.add_argument("--rate", default=None,
                                help="link rate per direction, a tc rate: 1gbit, 100mbit")
        sub_parser.add_argument("--delay", default=None,
                                help="one-way latency, e.g. 100us (needs the kernel's netem)")
    shape.add_argument("--off", action="store_true", help="remove any shaping")
    sub.add_parser("down", help="remove the cluster and any leftovers with this prefix")
    sub.add_parser("status", help="print the cluster's state as JSON")
    run = sub.add_parser("run", help="run a command on one host")
    run.add_argument("--host", type=int, default=0)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    mpi = sub.add_parser("mpirun", help="run a command on ranks across the hosts (from host 0)")
    mpi.add_argument("-np", "--np", type=int, default=None, help="ranks (default: all slots)")
    mpi.add_argument("-x", dest="forward", action="append", default=[], help="forward a variable")
    mpi.add_argument("--timeout", type=float, default=None)
    mpi.add_argument(
        "--on", type=int, action="append", default=None, metavar="INDEX",
        help="run only on this host (repeatable; default: every host)",
    )  # fmt: skip
    mpi.add_argument("argv", nargs=argparse.REMAINDER)
    kill = sub.add_parser("kill", help="kill every process on a host (node loss)")
    kill.add_argument("index", type=int)
    sub.add_parser(
        "mpi-args",
        help="print the mpirun options for this cluster (for a job script's own mpirun, "
        "e.g. MLBFGS_MPIRUN_ARGS of jobs/pbs.qsub)",
    )
    demo = sub.add_parser(
        "demo",
        help="watch a 2-host training job lose a host and resume on the survivor "
        "(builds its own cluster, removes it at the end)",
    )
    demo.add_argument("--steps", type=int, default=80, help="steps of the run")
    demo.add_argument("--checkpoint-every", type=int, default=20)
    demo.add_argument("--kill-after", type=int, default=45, help="kill host 1 at this step")
    demo.add_argument("--step-sleep", type=float, default=0.05, help="seconds per step extra")
    demo.add_argument("--run-dir", default=None, help="shared run dir (default: a new /tmp dir)")
    demo.add_argument("--report", default=None, help="also write the report as JSON here")
    demo.add_argument(
        "--keep-cluster", action="store_true", help="leave the cluster up (down it yourself)"
    )
    return p


def _strip_dashes(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (1 on a cluster error or bad argument)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return _main(args)
    except (ClusterError, ValueError) as exc:
        logger.error("%s", exc)
        return 1


def _main(args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    if args.prefix is None:
        args.prefix = DEFAULT_PREFIX
    if args.command == "up":
        cluster = NetnsCluster(
            hosts=args.hosts,
            slots=args.slots,
            prefix=args.prefix,
            scratch=args.scratch,
            scratch_size=args.scratch_size,
            state_dir=args.state_dir,
            link_rate=args.rate,
            link_delay=args.delay,
        ).up()
        sys.stdout.write(json.dumps(cluster.status(), indent=2) + "\n")
        return 0
    if args.command == "down":
        state_dir = Path(args.state_dir) if args.state_dir else None
        teardown_prefix(args.prefix, state_dir=state_dir)
        return 0
    cluster = NetnsCluster.load(prefix=args.prefix, state_dir=args.state_dir)
    if args.command == "status":
        sys.stdout.write(json.dumps(cluster.status(), indent=2) + "\n")
        return 0
    if args.command == "mpi-args":
        sys.stdout.write(shlex.join(cluster.mpi_options()) + "\n")
        return 0
    if args.command == "shape":
        if args.off == (args.rate is not None or args.delay is not None):
            _parser().error("shape: give --rate and/or --delay, or --off")
        cluster.shape(rate=args.rate, delay=args.delay)
        sys.stdout.write(json.dumps(cluster.status()["link"]) + "\n")
        return 0
    if args.command == "kill":
        killed = cluster.kill_host(args.index)
        sys.stdout.write(f"killed {len(killed)} process(es) on {cluster.host(args.index).name}\n")
        return 0
    cmd = _strip_dashes(args.argv)
    if not cmd:
        _parser().error(f"{args.command}: give the command after --")
    if args.command == "run":
        full = cluster.exec_cmd(args.host, cmd)
    else:
        used = len(args.on) if args.on else cluster.hosts_count
        np = args.np if args.np is not None else used * cluster.slots
        full = cluster.mpirun_cmd(
            np, cmd, forward=args.forward, timeout_s=args.timeout, hosts=args.on
        )
    logger.debug("exec: %s", shlex.join(full))
    return subprocess.call(full)


def _demo(args: argparse.Namespace) -> int:
    """``demo``: narrate :func:`.demo.run_node_loss_drill` on a cluster of its own."""
    # Imported here: the drill imports mlbfgs_hpc, which the other subcommands do not need.
    from . import demo as netns_demo

    start = time.monotonic()

    def say(msg: str) -> None:
        sys.stdout.write(f"[{time.monotonic() - start:6.1f}s] {msg}\n")
        sys.stdout.flush()

    prefix = args.prefix or DEMO_PREFIX
    run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="mlbfgs-demo-run-"))
    cluster = NetnsCluster(hosts=2, slots=2, prefix=prefix, state_dir=args.state_dir)
    say(f"building 2 hosts ({prefix}-n0, {prefix}-n1): network namespaces with their own host "
        "name and address on a private bridge; the file system is shared, like a cluster's")
    # SIGTERM/SIGHUP as Ctrl-C, so the finally below removes the cluster in every case.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    cluster.up()
    try:
        report = netns_demo.run_node_loss_drill(
            cluster, run_dir=run_dir, steps=args.steps, checkpoint_every=args.checkpoint_every,
            kill_after=args.kill_after, step_sleep=args.step_sleep, say=say,
        )  # fmt: skip
    except netns_demo.DrillError as exc:
        say(f"FAILED: {exc}")
        return 1
    finally:
        if args.keep_cluster:
            say(f"cluster left up: python {sys.argv[0]} --prefix {prefix} down")
        else:
            cluster.down()
            say(f"cluster {prefix} removed")
    t = report.timeline
    say("timeline (seconds after the kill): mpirun exited {mpirun_exit:.2f}, restart launched "
        "{restart_launched:.2f}, resumed {r:.2f}, first step {f:.2f}, finished {finished:.2f}"
        .format(r=t.get("resumed", float("nan")), f=t.get("first_step", float("nan")), **t))
    say(f"lost: steps {report.resumed_step}..{report.last_step_before_kill} "
        f"({report.lost_steps} steps, at most the {report.checkpoint_every} of one checkpoint "
        f"period); run dir {report.run_dir} (logs mpirun-1.log, mpirun-2.log)")
    if args.report:
        Path(args.report).write_text(report.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
