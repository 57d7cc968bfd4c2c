"""How Open MPI runs on a namespace cluster: the ``--mca`` settings (rsh agent, transports
and interfaces restricted to the cluster's subnet) and the ``mpirun`` command line that
launches ranks across its hosts (from host 0, or the first of the hosts chosen)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from .system import SUBNET

if TYPE_CHECKING:  # the cluster imports this module
    from .cluster import NetnsCluster

logger = logging.getLogger(__name__)


def mpi_options(cluster: NetnsCluster, *, mca: Mapping[str, str] | None = None) -> list[str]:
    """The ``--mca`` options that make Open MPI (run on a host) use this cluster.

    The rsh agent instead of ssh; ``vader`` (shared memory) between ranks of a host and
    TCP between hosts, both TCP and the out-of-band channel restricted to the cluster's
    subnet; ``mpi_yield_when_idle`` because every host shares this machine's cores, so
    ranks waiting in a collective must give the CPU to the ranks they wait for (busy
    polling made a 4-rank step ~70x slower here). Job scripts get these through their
    own variables (e.g. ``MLBFGS_MPIRUN_ARGS`` of ``jobs/pbs.qsub``).

    Args:
        mca: extra or overriding ``KEY: VALUE`` settings.
    """
    settings = {
        "plm_rsh_agent": str(cluster.agent_path),
        "btl": "self,vader,tcp",
        "btl_tcp_if_include": SUBNET,
        "oob_tcp_if_include": SUBNET,
        "mpi_yield_when_idle": "1",
    }
    settings.update(mca or {})
    argv: list[str] = []
    for key, value in settings.items():
        argv += ["--mca", key, value]
    return argv


def _check_host_indices(cluster: NetnsCluster, hosts: Sequence[int]) -> list[int]:
    chosen = list(hosts)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"hosts must be distinct host indices, at least one, got {hosts!r}")
    for index in chosen:
        cluster.host(index)  # ValueError naming the allowed range
    return chosen


def mpirun_cmd(
    cluster: NetnsCluster,
    np: int,
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    forward: Sequence[str] = (),
    mca: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    hostfile: str | os.PathLike[str] | None = None,
    hosts: Sequence[int] | None = None,
    oversubscribe: bool = False,
    timeout_s: float | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Command line that launches ``cmd`` on ``np`` ranks across the hosts.

    ``mpirun`` runs on host 0 (on the first of ``hosts`` when given). Ranks fill the first
    host's slots first (ranks 0..slots-1 there, and so on). Open MPI settings: see
    :func:`mpi_options`. Ranks are not bound to cores, since all "hosts" share this
    machine's cores.

    Args:
        np: number of ranks, in [1, slots * number of hosts used] (any positive number
            with ``oversubscribe``).
        cmd: the program each rank runs, with its arguments.
        env: variables set for every rank (``-x NAME=VALUE``). ``OMP_NUM_THREADS``
            defaults to the caller's value, else 1.
        forward: names of variables of the caller's environment to export (``-x NAME``);
            names not set at build time are skipped. ``PATH`` is always exported.
        mca: extra ``--mca`` settings (override the defaults of :func:`mpi_options`).
        extra_args: further mpirun arguments, placed before ``cmd``.
        hostfile: hostfile to use; the cluster's ``cluster.hostfile`` when None (the
            ``cluster.nodefile`` also works). Not together with ``hosts``.
        hosts: run only on these host indices (``--host ADDR:SLOTS,...``), e.g. ``[0]``
            to restart on the survivor after ``cluster.kill_host``; None: every host.
        oversubscribe: allow more ranks than slots.
        timeout_s: if given, mpirun is sent SIGTERM after this many seconds (SIGKILL 5 s
            later), so a stalled job (Horovod stalls rather than fails) is reaped inside
            the cluster; must be > 0.
        cwd: working directory of mpirun and the ranks; the caller's when None.
    """
    used = list(range(cluster.hosts_count))
    if hosts is not None:
        if hostfile is not None:
            raise ValueError("give hostfile or hosts, not both")
        used = _check_host_indices(cluster, hosts)
    slots = len(used) * cluster.slots
    if not isinstance(np, int) or np < 1 or (not oversubscribe and np > slots):
        allowed = ">= 1" if oversubscribe else f"in [1, {slots}]"
        raise ValueError(f"np must be an int {allowed}, got {np!r}")
    if not cmd:
        raise ValueError("cmd must name a program, got an empty sequence")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 or None, got {timeout_s!r}")
    exports = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    exports.update(env or {})
    argv: list[str] = []
    if timeout_s is not None:
        argv += ["timeout", "--kill-after=5", f"{timeout_s:g}"]
    argv += ["mpirun", "--allow-run-as-root", *mpi_options(cluster, mca=mca)]
    if hosts is not None:
        argv += ["--host", ",".join(f"{cluster.hosts[i].address}:{cluster.slots}" for i in used)]
    else:
        argv += ["--hostfile", str(hostfile if hostfile is not None else cluster.hostfile)]
    argv += ["-np", str(np), "--bind-to", "none"]
    if oversubscribe:
        argv.append("--oversubscribe")
    argv += ["-x", "PATH"]
    for name in forward:
        if name in os.environ and name not in exports:
            argv += ["-x", name]
        elif name not in os.environ:
            logger.debug("not forwarding %s: not set", name)
    for name, value in exports.items():
        argv += ["-x", f"{name}={value}"]
    argv += list(extra_args)
    argv += list(cmd)
    return cluster.exec_cmd(used[0], argv, cwd=cwd)
