"""A real multi-node SLURM cluster on the namespace hosts of ``tools/netns_cluster.py``.

One ``slurmd`` per host (``NodeName`` = the host's name, ``NodeAddr`` = its address), with
``slurmctld`` and ``munged`` on host 0; clients (``sbatch``, ``srun``, ``squeue``) run on a
host too, through the cluster's rsh agent, since the hosts' addresses are reachable only from
inside the cluster. Everything lives in ``<cluster state dir>/slurm`` and every daemon runs in
a host's namespaces, so the cluster's ``down`` removes all of it (no separate clean-up can be
forgotten). ``sbatch -N 2`` jobs launching ``srun --mpi=pmix`` then run ranks on both hosts::

    cluster = NetnsCluster(hosts=2, slots=2, scratch="/tmp/x-scratch").up()
    slurm = NetnsSlurm(cluster=cluster).start()
    job = slurm.sbatch(["-N", "2", "--ntasks-per-node=2", "job.sh"], cwd=repo)
    record = slurm.wait(job, timeout_s=300)       # scontrol fields: JobState, ExitCode, ...

Choices forced by running several "nodes" on one machine, each learnt the hard way:

* One munged for all hosts: its socket is a file on the shared file system, and a path-named
  Unix socket is reachable from every network namespace (slurmd on host 1 uses it as well).
* ``CgroupPlugin=cgroup/v1`` in ``cgroup.conf``: ``ip netns exec`` mounts a fresh ``/sys``
  for the namespace, without ``/sys/fs/cgroup``, and slurmd 22.05's cgroup auto-detection
  then fails ("No filesystem mounted on /sys/fs/cgroup", "slurmd initialization failed").
  Nothing here uses cgroups (``proctrack/linuxproc``, ``task/none``).
* PMIx client directories on node-local scratch (``mpi.conf`` ``PMIxCliTmpDirBase``): by
  default both slurmstepds create ``/tmp/spmix_appdir_<uid>_<job>.<step>`` on the shared
  ``/tmp``, and the second fails with "File exists", aborting the step. So the cluster must
  have node-local scratch, as real clusters do.
* Ports 6917/6918 by default (the single-node ``tools/slurm_local.sh`` uses 6817/6818; they
  could not clash anyway, each network namespace has its own ports) and ``CPUs`` = 2 x slots
  per node (oversubscribed on purpose, like the single-node cluster).

Needs root, munge and slurm-wlm (``slurmctld``, ``slurmd``, ``sbatch``, ``srun``) 22.05+.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REQUIRED_BINARIES: tuple[str, ...] = (
    "munged", "mungekey", "munge", "unmunge", "runuser", "slurmctld", "slurmd", "sbatch",
    "srun", "sinfo", "scontrol", "scancel")
#: Job states after which a job never runs again.
TERMINAL_STATES: frozenset[str] = frozenset({
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY",
    "PREEMPTED", "TIMEOUT"})
_KEY_VALUE = re.compile(r"(\w[\w/:]*)=(\S*)")
_CMD_TIMEOUT_S = 30.0
_POLL_S = 0.25


class SlurmClusterError(RuntimeError):
    """A Slurm daemon did not start, a command failed, or a job did not finish in time."""


def missing_binaries() -> list[str]:
    """Names of :data:`REQUIRED_BINARIES` that are not on ``PATH``."""
    return [b for b in REQUIRED_BINARIES if shutil.which(b) is None]


class NetnsSlurm:
    """SLURM daemons on the hosts of a running namespace cluster.

    Args:
        cluster: a running ``NetnsCluster`` with node-local scratch (``scratch`` set).
        ctld_port: ``SlurmctldPort``, 1024..65535.
        slurmd_port: ``SlurmdPort``, 1024..65535, not ``ctld_port``.
        cpus_per_host: ``CPUs`` each node reports, >= 1 (default: 2 x the cluster's slots).
        start_timeout_s: how long :meth:`start` waits for every node to be idle, > 0.
    """

    def __init__(self, *, cluster: Any, ctld_port: int = 6917, slurmd_port: int = 6918,
                 cpus_per_host: int | None = None, start_timeout_s: float = 30.0) -> None:
        if cluster.scratch is None:
            raise ValueError("cluster must have node-local scratch (scratch=...): PMIx needs "
                             "a per-node directory")
        for name, port in (("ctld_port", ctld_port), ("slurmd_port", slurmd_port)):
            if not isinstance(port, int) or not 1024 <= port <= 65535:
                raise ValueError(f"{name} must be an int in [1024, 65535], got {port!r}")
        if ctld_port == slurmd_port:
            raise ValueError(f"ctld_port and slurmd_port must differ, both are {ctld_port}")
        cpus = cpus_per_host if cpus_per_host is not None else 2 * cluster.slots
        if not isinstance(cpus, int) or cpus < 1:
            raise ValueError(f"cpus_per_host must be an int >= 1, got {cpus_per_host!r}")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout_s must be > 0, got {start_timeout_s!r}")
        self.cluster = cluster
        self.ctld_port = ctld_port
        self.slurmd_port = slurmd_port
        self.cpus_per_host = cpus
        self.start_timeout_s = start_timeout_s
        self.state_dir = Path(cluster.state_dir) / "slurm"
        self.conf = self.state_dir / "slurm.conf"
        self.munge_dir = self.state_dir / "munge"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.log_dir = self.state_dir / "log"
        self.partition = "mn"

    # ---- environment and commands ----------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF`` (jobs inherit it from sbatch)."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, argv: Sequence[str], *, host: int = 0, env: Mapping[str, str] | None = None,
            cwd: str | os.PathLike[str] | None = None, timeout_s: float = _CMD_TIMEOUT_S,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command on host ``host`` with this cluster's ``SLURM_CONF``.

        Args:
            argv: the command, e.g. ``["sinfo", "-N"]``.
            host: index of the host to run it on.
            env: extra environment variables.
            cwd: working directory there (the caller's when None).
            timeout_s: bound on the command, > 0; expiry raises SlurmClusterError.
            check: raise SlurmClusterError on a non-zero exit.
        """
        full_env = {**self.env, **(env or {})}
        try:
            proc = subprocess.run(self.cluster.exec_cmd(host, list(argv), cwd=cwd),
                                  capture_output=True, text=True, env=full_env,
                                  timeout=timeout_s, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise SlurmClusterError(f"{shlex.join(argv)} ran past {timeout_s:.0f} s") from exc
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{shlex.join(argv)} exited {proc.returncode}: "
                                    f"{(proc.stderr or proc.stdout).strip()}")
        return proc

    # ---- start -----------------------------------------------------------------------------
    def start(self) -> NetnsSlurm:
        """Write the configuration, start munged, slurmctld and one slurmd per host, and wait
        until every node is idle. Raises SlurmClusterError (with daemon log tails) if not."""
        missing = missing_binaries()
        if missing:
            raise SlurmClusterError(f"missing {', '.join(missing)} "
                                    "(apt-get install slurm-wlm munge)")
        self._write_configs()
        self._start_munged()
        host0 = self.cluster.hosts[0]
        self._daemon(0, ["slurmctld", "-c"], "slurmctld")
        for h in self.cluster.hosts:
            (self.state_dir / f"slurmd-{h.name}").mkdir(parents=True, exist_ok=True)
            self._daemon(h.index, ["slurmd", "-c", "-N", h.name], f"slurmd on {h.name}")
        deadline = time.monotonic() + self.start_timeout_s
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
            states = dict(line.split()[:2] for line in out.splitlines() if line.strip())
            if len(states) == self.cluster.hosts_count and all(
                    s.startswith(("idle", "mixed", "allocated")) for s in states.values()):
                logger.info("slurm up: controller on %s, nodes %s", host0.name,
                            ", ".join(sorted(states)))
                return self
            time.sleep(_POLL_S)
        raise SlurmClusterError(f"nodes not idle after {self.start_timeout_s:.0f} s "
                                f"(sinfo: {states}){self.log_tails()}")

    def _write_configs(self) -> None:
        s = self.state_dir
        for d in (s, self.log_dir, s / "ctld"):
            d.mkdir(parents=True, exist_ok=True)
        mem_mb = _mem_total_mb() // (2 * self.cluster.hosts_count)
        host0 = self.cluster.hosts[0]
        nodes = "".join(
            f"NodeName={h.name} NodeAddr={h.address} CPUs={self.cpus_per_host} Sockets=1 "
            f"CoresPerSocket={self.cpus_per_host} ThreadsPerCore=1 RealMemory={mem_mb} "
            f"State=UNKNOWN\n" for h in self.cluster.hosts)
        names = ",".join(h.name for h in self.cluster.hosts)
        self.conf.write_text(f"""\
# Generated by tools/netns/slurm.py: a {self.cluster.hosts_count}-node cluster on namespace hosts.
ClusterName={self.cluster.prefix.replace('-', '')}
SlurmctldHost={host0.name}({host0.address})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={self.ctld_port}
SlurmdPort={self.slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={s}/ctld
# %n: the node name, so each slurmd has its own spool, pid and log file on the shared disk.
SlurmdSpoolDir={s}/slurmd-%n
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd-%n.pid
SlurmctldLogFile={self.log_dir}/slurmctld.log
SlurmdLogFile={self.log_dir}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmix
TmpFS={self.cluster.scratch}
ReturnToService=2
SlurmdParameters=config_overrides
MinJobAge=300
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.log_dir}/jobcomp.txt
MailProg=/bin/true
{nodes}PartitionName={self.partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP
""")
        (s / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        (s / "mpi.conf").write_text(f"PMIxCliTmpDirBase={self.cluster.scratch}\n")

    def _start_munged(self) -> None:
        d = self.munge_dir
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", str(d)],
                       check=True, timeout=_CMD_TIMEOUT_S)
        key = d / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}", "--force"],
                           check=True, timeout=_CMD_TIMEOUT_S, capture_output=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
        self._daemon(0, ["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}",
                         f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
                         f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"],
                     "munged")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = self.run(["sh", "-c", f"munge -n --socket={self.munge_socket} | "
                                          f"unmunge --socket={self.munge_socket}"],
                             host=self.cluster.hosts_count - 1, check=False)
            if probe.returncode == 0:
                return
            time.sleep(0.1)
        raise SlurmClusterError(f"munged on {self.munge_socket} does not answer"
                                f"{self.log_tails()}")

    def _daemon(self, host: int, argv: list[str], what: str) -> None:
        # The daemons fork into the background; they stay in the host's namespaces.
        proc = self.run(argv, host=host, check=False)
        if proc.returncode != 0:
            raise SlurmClusterError(f"{what} failed to start (rc={proc.returncode}): "
                                    f"{proc.stderr.strip()}{self.log_tails()}")

    def log_tails(self, lines: int = 15) -> str:
        """The last ``lines`` lines of every daemon log, for error messages."""
        parts = []
        for path in sorted([*self.log_dir.glob("*.log"), self.munge_dir / "munged.log"]):
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"\n---- {path}\n" + "\n".join(tail))
        return "".join(parts)

    # ---- jobs ------------------------------------------------------------------------------
    def sbatch(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike[str] | None = None) -> str:
        """``sbatch --parsable ARGS`` on host 0; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd).stdout.strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SlurmClusterError(f"sbatch printed no job id: {out!r}")
        return job_id

    def job_record(self, job_id: str) -> dict[str, str] | None:
        """``scontrol -o show job`` fields, None when slurmctld does not know the job."""
        proc = self.run(["scontrol", "-o", "show", "job", job_id], check=False)
        if proc.returncode != 0 or "JobId=" not in proc.stdout:
            return None
        return dict(_KEY_VALUE.findall(proc.stdout.splitlines()[0]))

    def wait(self, job_id: str, *, timeout_s: float) -> dict[str, str]:
        """Wait for the job to reach a final state; cancel it and raise after ``timeout_s``."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        deadline = time.monotonic() + timeout_s
        record: dict[str, str] | None = None
        while time.monotonic() < deadline:
            record = self.job_record(job_id)
            if record is not None and record.get("JobState") in TERMINAL_STATES:
                return record
            time.sleep(_POLL_S)
        self.run(["scancel", "--full", job_id], check=False)
        state = record.get("JobState") if record else None
        raise SlurmClusterError(f"job {job_id} not finished after {timeout_s:.0f} s "
                                f"(state {state}); cancelled{self.log_tails()}")

    def stop(self) -> None:
        """Cancel every job and stop the daemons (the cluster's ``down`` also kills them)."""
        if self.conf.exists():
            self.run(["scancel", "--full", "--user=root"], check=False, timeout_s=10)
        pids = []
        for pidfile in [self.state_dir / "slurmctld.pid", self.munge_dir / "munged.pid",
                        *self.state_dir.glob("slurmd-*.pid")]:
            try:
                pids.append(int(pidfile.read_text().strip()))
            except (OSError, ValueError):
                continue
        # Only pids still inside this cluster's hosts: a recycled pid must never be hit.
        ours = {p for h in self.cluster.hosts for p in _netns_pids(h.netns)}
        for pid in pids:
            if pid in ours:
                try:
                    os.kill(pid, 15)
                except ProcessLookupError:
                    pass


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True,
                         timeout=_CMD_TIMEOUT_S).stdout
    return [int(t) for t in out.split() if t.isdigit()]


def _mem_total_mb() -> int:
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    raise SlurmClusterError("no MemTotal in /proc/meminfo")
