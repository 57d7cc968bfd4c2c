"""A multi-host MPI test cluster on one machine, built from Linux network namespaces.

Each "host" is a network namespace with its own link-local address ``169.254.77.(i+1)/24``
on a virtual Ethernet cable into a Linux bridge; the bridge lives in a namespace of its own,
so nothing is added to, or sent through, the root namespace's network. Open MPI reaches the
hosts through a generated *rsh agent* (a stand-in for ssh) and the hosts are listed in an
Open MPI hostfile and a PBS-style nodefile. See ``shared/MULTINODE.md`` for the recipe.

How a host is entered: at ``up`` every host gets one long-lived *holder* process, started as
``ip netns exec NS unshare --mount --uts --propagation slave sh -c '...; exec sleep
infinity'``. ``ip netns exec`` puts it in the host's network namespace and remounts ``/sys``
for that namespace; ``unshare`` gives it its own mount namespace (where the host's
``/etc/hosts`` and optional node-local scratch tmpfs are mounted; "slave" so these never
propagate out, while mounts and unmounts of the machine, e.g. ``ip netns del``, still
propagate in) and a UTS namespace whose host name is the host's name. Everything that runs
"on" the host (Open MPI's daemons through the agent, the launching ``mpirun``) enters those
namespaces with ``nsenter``: the network namespace by its name under ``/run/netns`` (so a
dead holder whose pid was recycled can never put a process into the root namespace's
network) and the mount/UTS namespaces through the holder, after checking that the holder
still lives in the host's network namespace. A fresh
``unshare`` per command (the recipe's agent) could not do this: every command would get its
own empty scratch, and scratch written by one job would be gone for the next.

Distinct host names matter: Open MPI and Horovod decide which ranks share a node by host
name; with one name for every "host", Horovod's initialisation crashed inside Open MPI.

Used as a library (``NetnsCluster``) by ``tests/netns_fixture.py`` and as a CLI::

    python tools/netns_cluster.py up --hosts 2 --slots 2 [--scratch /scratch/local]
    python tools/netns_cluster.py status
    python tools/netns_cluster.py run [--host 1] -- hostname
    python tools/netns_cluster.py mpirun -np 4 -- hostname
    python tools/netns_cluster.py mpirun --on 0 -- hostname    # only on host 0
    python tools/netns_cluster.py mpi-args          # mpirun options for a job script's mpirun
    python tools/netns_cluster.py kill 1
    python tools/netns_cluster.py down
    python tools/netns_cluster.py demo    # own cluster: train on 2 hosts, lose one, resume

``demo`` is ``tools/netns_demo.py`` (the node-loss drill); ``tools/netns_slurm.py`` runs a
multi-node SLURM (one slurmd per host) on such a cluster.

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2, util-linux (unshare, nsenter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The only addresses this tool ever assigns or lets Open MPI use: link-local, on cables
#: between namespaces this tool created.
SUBNET = "169.254.77.0/24"
_ADDRESS_BASE = "169.254.77."
MAX_HOSTS = 64
MAX_SLOTS = 256
DEFAULT_PREFIX = "mlbfgs"
#: Prefix of the cluster ``demo`` builds, so it never collides with one brought up by ``up``.
DEMO_PREFIX = "mlbdemo"
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_SIZE_RE = re.compile(r"^[1-9][0-9]*[kmgKMG]?$")
_STATE_FILE = "cluster.json"
_NETNS_RUN_DIR = Path("/run/netns")
# Bounds for the system commands the tool runs; none of them should take more than a blink.
_CMD_TIMEOUT_S = 30.0
_HOLDER_READY_TIMEOUT_S = 20.0
_KILL_WAIT_S = 10.0


class ClusterError(RuntimeError):
    """A system command needed to build, use or remove the cluster failed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Host:
    """One namespace host of a cluster.

    Args:
        index: position i of the host, 0-based.
        name: host name its processes see (UTS namespace), e.g. ``mlbfgs-n0``.
        netns: name of its network namespace (same as ``name``).
        address: its IPv4 address, ``169.254.77.(i+1)``.
    """

    index: int
    name: str
    netns: str
    address: str


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = _CMD_TIMEOUT_S) -> str:
    """Run a system command, returning stdout; raise ClusterError with stderr on failure."""
    logger.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"timed out after {timeout}s: {shlex.join(argv)}") from exc
    if check and proc.returncode != 0:
        raise ClusterError(
            f"command failed (rc={proc.returncode}): {shlex.join(argv)}: {proc.stderr.strip()}"
        )
    return proc.stdout


def list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _run(["ip", "netns", "list"])
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    """Pids of every process whose network namespace is ``netns`` (``ip netns pids``)."""
    out = _run(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _prefix_netns_re(prefix: str) -> re.Pattern[str]:
    # Exact shape, so prefix "a" never matches another cluster named "a-b".
    return re.compile(rf"^{re.escape(prefix)}-(n[0-9]+|br)$")


def default_state_dir(prefix: str) -> Path:
    """Where a cluster with ``prefix`` keeps its agent, host files and state by default."""
    return Path(tempfile.gettempdir()) / f"netns-cluster-{prefix}"


def _validate_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not _PREFIX_RE.match(prefix):
        raise ValueError(
            "prefix must be 1-32 chars of lowercase letters, digits and '-', starting with a "
            f"letter, got {prefix!r}"
        )


def _kill_netns_processes(netns: str, *, wait_s: float = _KILL_WAIT_S) -> list[int]:
    """SIGKILL every process in ``netns`` until none is left (bounded); return the pids."""
    killed: list[int] = []
    deadline = time.monotonic() + wait_s
    while True:
        pids = [p for p in netns_pids(netns) if p != os.getpid()]
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise ClusterError(f"processes in {netns} survive SIGKILL: {pids}")
        # A dying process may still fork (e.g. a daemon mid-spawn): look again shortly.
        time.sleep(0.05)


def _scratch_paths_of_other_clusters(own_state_dir: Path) -> list[Path]:
    paths: list[Path] = []
    for state_path in Path(tempfile.gettempdir()).glob(f"netns-cluster-*/{_STATE_FILE}"):
        if state_path.parent == own_state_dir:
            continue
        try:
            scratch = json.loads(state_path.read_text()).get("scratch")
        except (OSError, ValueError):
            continue
        if scratch:
            paths.append(Path(scratch))
    return paths


def teardown_prefix(prefix: str, *, state_dir: Path | None = None) -> list[str]:
    """Remove every trace of the cluster called ``prefix``; safe to call any number of times.

    Kills all processes in its namespaces (which frees the node-local tmpfs mounts, as they
    live only in the holders' private mount namespaces), deletes the namespaces (the veth
    cables and the bridge go with them), removes scratch directories the cluster created (if
    empty) and the state directory. Works from the namespace names alone, so it also cleans
    up after a run that crashed before writing its state.

    Args:
        prefix: the cluster's name prefix, as given to :class:`NetnsCluster`.
        state_dir: its state directory; ``default_state_dir(prefix)`` when None.

    Returns:
        Names of the namespaces that were deleted.
    """
    _validate_prefix(prefix)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(prefix)
    state: dict[str, Any] = {}
    state_path = state_dir / _STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("unreadable state %s (%s); cleaning by name only", state_path, exc)
    pattern = _prefix_netns_re(prefix)
    # Hosts first so no process is left talking while the bridge goes away.
    names = sorted((n for n in list_netns() if pattern.match(n)), key=lambda n: n.endswith("-br"))
    for name in names:
        killed = _kill_netns_processes(name)
        if killed:
            logger.info("killed %d process(es) in %s", len(killed), name)
        _run(["ip", "netns", "del", name])
    # Only directories this cluster created, deepest first, and only while empty: never
    # delete a file someone else put there. Nor one another cluster uses as scratch: removing
    # a directory detaches whatever other mount namespaces have mounted on it.
    in_use = _scratch_paths_of_other_clusters(state_dir)
    for created in reversed(state.get("created_dirs", [])):
        if any(p == Path(created) or Path(created) in p.parents for p in in_use):
            logger.info("left %s in place: another cluster's scratch is under it", created)
            continue
        try:
            Path(created).rmdir()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("left scratch directory %s in place: %s", created, exc)
    if state_dir.exists():
        shutil.rmtree(state_dir)
    # Open MPI session directories are named after the host name, which is this cluster's
    # own; a daemon killed by kill_host or SIGKILL never removes its own.
    for session_dir in Path(tempfile.gettempdir()).glob("ompi.*"):
        host = session_dir.name.split(".")[1] if session_dir.name.count(".") >= 2 else ""
        if pattern.match(host):
            shutil.rmtree(session_dir, ignore_errors=True)
    if names:
        logger.info("cluster %s removed (%s)", prefix, ", ".join(names))
    return names


class NetnsCluster:
    """N namespace hosts joined by a bridge, ready for ``mpirun`` across them.

    ``up()`` builds it, ``down()`` removes it; the object is also a context manager.
    """

    def __init__(
        self,
        *,
        hosts: int = 2,
        slots: int = 2,
        prefix: str = DEFAULT_PREFIX,
        scratch: str | os.PathLike[str] | None = None,
        scratch_size: str = "256m",
        state_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        """Describe a cluster (nothing is created until :meth:`up`).

        Args:
            hosts: number of hosts, 1..64.
            slots: MPI slots per host (hostfile ``slots=``), 1..256.
            prefix: name prefix of hosts and namespaces (``PREFIX-n0``, ``PREFIX-br``);
                distinct prefixes let clusters coexist. 1-32 chars of ``[a-z0-9-]``,
                starting with a letter.
            scratch: absolute path at which every host's processes see a private tmpfs
                (node-local scratch); None for none. Must not be ``/`` and must not contain
                the state directory (the agent lives there).
            scratch_size: tmpfs ``size=`` of each host's scratch, e.g. ``256m``.
            state_dir: directory for the agent, hostfile, nodefile and state; defaults to
                ``default_state_dir(prefix)``.
        """
        if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be an int in [1, {MAX_HOSTS}], got {hosts!r}")
        if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an int in [1, {MAX_SLOTS}], got {slots!r}")
        _validate_prefix(prefix)
        if not _SIZE_RE.match(scratch_size):
            raise ValueError(
                f"scratch_size must be a positive size like '256m' or '1g', got {scratch_size!r}"
            )
        self.hosts_count = hosts
        self.slots = slots
        self.prefix = prefix
        self.scratch_size = scratch_size
        self.state_dir = (
            Path(state_dir).absolute() if state_dir is not None else default_state_dir(prefix)
        )
        self.scratch: Path | None = None
        if scratch is not None:
            path = Path(scratch)
            if not path.is_absolute() or path == Path("/"):
                raise ValueError(
                    f"scratch must be an absolute path other than '/', got {scratch!r}"
                )
            if self.state_dir == path or path in self.state_dir.parents:
                raise ValueError(
                    f"scratch must not contain state_dir {str(self.state_dir)!r}, got {scratch!r}"
                )
            self.scratch = path
        self.hosts: list[Host] = [
            Host(
                index=i,
                name=f"{prefix}-n{i}",
                netns=f"{prefix}-n{i}",
                address=f"{_ADDRESS_BASE}{i + 1}",
            )
            for i in range(hosts)
        ]
        self.bridge_netns = f"{prefix}-br"
        self.holder_pids: dict[int, int] = {}
        self.created_dirs: list[str] = []
        self.up_seconds: float | None = None
        # Holders this process started, so it can reap them (no zombies in a long pytest run).
        self._holders: dict[int, subprocess.Popen[bytes]] = {}

    # ---- paths -------------------------------------------------------------------------
    @property
    def agent_path(self) -> Path:
        """The rsh agent Open MPI uses instead of ssh: ``AGENT HOST COMMAND...``."""
        return self.state_dir / "rsh_agent.sh"

    @property
    def hostfile(self) -> Path:
        """Open MPI hostfile: one ``ADDRESS slots=N`` line per host."""
        return self.state_dir / "hostfile"

    @property
    def nodefile(self) -> Path:
        """PBS-style nodefile (``$PBS_NODEFILE``): each host name repeated ``slots`` times."""
        return self.state_dir / "nodefile"

    @property
    def total_slots(self) -> int:
        """Slots over all hosts."""
        return self.hosts_count * self.slots

    def host(self, index: int) -> Host:
        """The host at ``index``; ValueError outside [0, hosts)."""
        if not isinstance(index, int) or not 0 <= index < self.hosts_count:
            raise ValueError(f"host index must be an int in [0, {self.hosts_count}), got {index!r}")
        return self.hosts[index]

    # ---- lifecycle ---------------------------------------------------------------------
    def up(self) -> NetnsCluster:
        """Create namespaces, bridge, cables, holders, agent and host files.

        Raises ClusterError if a cluster with this prefix already exists (``down`` it first)
        or a system command fails; a partial cluster is removed before raising.
        """
        pattern = _prefix_netns_re(self.prefix)
        existing = [n for n in list_netns() if pattern.match(n)]
        if existing or (self.state_dir / _STATE_FILE).exists():
            raise ClusterError(
                f"cluster {self.prefix!r} already exists ({', '.join(existing) or self.state_dir});"
                f" run 'down --prefix {self.prefix}' first"
            )
        start = time.monotonic()
        try:
            self._build()
        except BaseException:
            # Also on KeyboardInterrupt: never leave half a cluster behind.
            logger.error("bringing up cluster %s failed; removing what was built", self.prefix)
            self.down()
            raise
        self.up_seconds = time.monotonic() - start
        self._write_state()
        logger.info(
            "cluster %s up: %d hosts x %d slots in %.2fs",
            self.prefix,
            self.hosts_count,
            self.slots,
            self.up_seconds,
        )
        return self

    def _build(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=False)
        self._write_state()  # early, so a crash mid-build still records created_dirs
        (self.state_dir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        )
        _run(["ip", "netns", "add", self.bridge_netns])
        self._disable_ipv6(self.bridge_netns)
        _run(["ip", "-n", self.bridge_netns, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge_netns, "link", "set", "lo", "up"])
        _run(["ip", "-n", self.bridge_netns, "link", "set", "br0", "up"])
        for h in self.hosts:
            _run(["ip", "netns", "add", h.netns])
            self._disable_ipv6(h.netns)
            port = f"p{h.index}"
            # Created directly between the two namespaces: no interface ever exists in the
            # root namespace, not even for an instant.
            _run(
                ["ip", "-n", self.bridge_netns, "link", "add", port, "type", "veth",
                 "peer", "name", "eth0", "netns", h.netns]
            )  # fmt: skip
            _run(["ip", "-n", self.bridge_netns, "link", "set", port, "master", "br0", "up"])
            _run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
        if self.scratch is not None:
            self._make_scratch_dir(self.scratch)
            self._write_state()
        for h in self.hosts:
            self._start_holder(h)
        self._write_agent()
        self.hostfile.write_text("".join(f"{h.address} slots={self.slots}\n" for h in self.hosts))
        self.nodefile.write_text("".join(f"{h.name}\n" * self.slots for h in self.hosts))
        self._write_state()

    @staticmethod
    def _disable_ipv6(netns: str) -> None:
        # Otherwise every interface gets an fe80:: address and sends router solicitations;
        # only addresses this tool assigns should ever be used.
        script = (
            "for f in /proc/sys/net/ipv6/conf/all/disable_ipv6 "
            "/proc/sys/net/ipv6/conf/default/disable_ipv6; do "
            '[ -w "$f" ] && echo 1 > "$f"; done; true'
        )
        _run(["ip", "netns", "exec", netns, "sh", "-c", script], check=False)

    def _make_scratch_dir(self, path: Path) -> None:
        # Remember each directory we create so teardown can remove exactly those.
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        self.created_dirs.extend(str(m) for m in reversed(missing))

    def _holder_script(self, h: Host) -> str:
        lines = [
            "set -e",
            f"hostname {shlex.quote(h.name)}",
            # Cluster host names resolve on every host, as on a real cluster, without
            # touching the root namespace's /etc/hosts (this bind lives in the holder's
            # private mount namespace).
            f"mount --bind {shlex.quote(str(self.state_dir / 'hosts'))} /etc/hosts",
        ]
        if self.scratch is not None:
            lines.append(
                f"mount -t tmpfs -o size={self.scratch_size},mode=1777 "
                f"{shlex.quote(self.prefix + '-scratch')} {shlex.quote(str(self.scratch))}"
            )
        lines += ["echo ready", "exec sleep infinity"]
        return "\n".join(lines)

    def _start_holder(self, h: Host) -> None:
        log_path = self.state_dir / f"{h.netns}.holder.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts",
                 "--propagation", "slave", "sh", "-c", self._holder_script(h)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                # Own session: a Ctrl-C in the terminal that ran `up` must not kill the hosts.
                start_new_session=True,
            )  # fmt: skip
        assert proc.stdout is not None
        self._holders[h.index] = proc
        line = b""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if sel.select(timeout=_HOLDER_READY_TIMEOUT_S):
                line = proc.stdout.readline()
        # `sleep infinity` never writes, so closing our end of the pipe is harmless.
        proc.stdout.close()
        if line.strip() != b"ready":
            proc.kill()
            proc.wait(timeout=_CMD_TIMEOUT_S)
            raise ClusterError(
                f"holder for {h.name} did not start (rc={proc.returncode}): "
                f"{log_path.read_text(errors='replace').strip()}"
            )
        # ip netns exec, unshare and sh all exec, so the Popen pid is the holder itself.
        self.holder_pids[h.index] = proc.pid
        (self.state_dir / f"{h.netns}.pid").write_text(f"{proc.pid}\n")

    def _write_agent(self) -> None:
        cases = "".join(
            f"  {h.address}|{h.name}) ns={h.netns} ;;\n" for h in self.hosts
        )
        state = shlex.quote(str(self.state_dir))
        agent = f"""#!/bin/sh
# rsh agent of namespace cluster {self.prefix}, generated by tools/netns_cluster.py.
# Open MPI runs: AGENT HOST COMMAND...   (HOST: a cluster address or host name)
host=$1; shift
case $host in
{cases}  *) echo "$0: $host is not a host of cluster {self.prefix}" >&2; exit 255 ;;
esac
pid=$(cat {state}/$ns.pid 2>/dev/null) || {{ echo "$0: no holder for $ns" >&2; exit 255; }}
# The holder owns the host's mount (scratch, /etc/hosts) and UTS (host name) namespaces.
# Use it only while it still lives in the host's network namespace: a killed host's pid may
# have been recycled by an unrelated process.
have=$(stat -L -c %d:%i /proc/$pid/ns/net 2>/dev/null)
want=$(stat -L -c %d:%i /run/netns/$ns)
if [ "$have" != "$want" ]; then
  echo "$0: host $ns is down" >&2; exit 255
fi
# The network namespace is entered by name, never through the pid.
exec nsenter --net=/run/netns/$ns --mount=/proc/$pid/ns/mnt --uts=/proc/$pid/ns/uts \\
  -- /bin/sh -c "$*"
"""
        self.agent_path.write_text(agent)
        self.agent_path.chmod(0o755)

    def _write_state(self) -> None:
        state = {
            "prefix": self.prefix,
            "hosts": self.hosts_count,
            "slots": self.slots,
            "scratch": str(self.scratch) if self.scratch is not None else None,
            "scratch_size": self.scratch_size,
            "state_dir": str(self.state_dir),
            "holder_pids": {str(k): v for k, v in self.holder_pids.items()},
            "created_dirs": self.created_dirs,
            "up_seconds": self.up_seconds,
        }
        tmp = self.state_dir / (_STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / _STATE_FILE)

    @classmethod
    def load(
        cls, *, prefix: str = DEFAULT_PREFIX, state_dir: str | os.PathLike[str] | None = None
    ) -> NetnsCluster:
        """Attach to a cluster brought up earlier (e.g. by the CLI's ``up``).

        Args:
            prefix: the cluster's prefix.
            state_dir: its state directory; ``default_state_dir(prefix)`` when None.

        Raises:
            ClusterError: no state for that cluster.
        """
        _validate_prefix(prefix)
        sd = Path(state_dir) if state_dir is not None else default_state_dir(prefix)
        try:
            state = json.loads((sd / _STATE_FILE).read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no cluster {prefix!r} (no {sd / _STATE_FILE})") from exc
        cluster = cls(
            hosts=state["hosts"],
            slots=state["slots"],
            prefix=state["prefix"],
            scratch=state["scratch"],
            scratch_size=state["scratch_size"],
            state_dir=state["state_dir"],
        )
        cluster.holder_pids = {int(k): v for k, v in state["holder_pids"].items()}
        cluster.created_dirs = list(state["created_dirs"])
        cluster.up_seconds = state.get("up_seconds")
        return cluster

    def down(self) -> list[str]:
        """Remove the cluster (idempotent); see :func:`teardown_prefix`."""
        removed = teardown_prefix(self.prefix, state_dir=self.state_dir)
        self._reap_holders()
        self.holder_pids.clear()
        return removed

    def _reap_holders(self) -> None:
        for index, proc in list(self._holders.items()):
            if proc.poll() is not None:
                del self._holders[index]

    def __enter__(self) -> NetnsCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ---- using it ----------------------------------------------------------------------
    def exec_cmd(
        self, index: int, argv: Sequence[str], *, cwd: str | os.PathLike[str] | None = None
    ) -> list[str]:
        """Command line that runs ``argv`` on host ``index`` (through the rsh agent).

        Args:
            index: host index, in [0, hosts).
            argv: the program and its arguments (not a shell string).
            cwd: working directory there; the caller's current directory when None.

        The environment is the caller's (the agent passes it through).
        """
        h = self.host(index)
        if not argv:
            raise ValueError("argv must name a program, got an empty sequence")
        workdir = str(cwd) if cwd is not None else os.getcwd()
        script = f"cd {shlex.quote(workdir)} && exec {shlex.join(list(argv))}"
        return [str(self.agent_path), h.address, script]

    def mpi_options(self, *, mca: Mapping[str, str] | None = None) -> list[str]:
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
            "plm_rsh_agent": str(self.agent_path),
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

    def _check_host_indices(self, hosts: Sequence[int]) -> list[int]:
        chosen = list(hosts)
        if not chosen or len(set(chosen)) != len(chosen):
            raise ValueError(f"hosts must be distinct host indices, at least one, got {hosts!r}")
        for index in chosen:
            self.host(index)  # ValueError naming the allowed range
        return chosen

    def mpirun_cmd(
        self,
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
        :meth:`mpi_options`. Ranks are not bound to cores, since all "hosts" share this
        machine's cores.

        Args:
            np: number of ranks, in [1, slots * number of hosts used] (any positive number
                with ``oversubscribe``).
            cmd: the program each rank runs, with its arguments.
            env: variables set for every rank (``-x NAME=VALUE``). ``OMP_NUM_THREADS``
                defaults to the caller's value, else 1.
            forward: names of variables of the caller's environment to export (``-x NAME``);
                names not set at build time are skipped. ``PATH`` is always exported.
            mca: extra ``--mca`` settings (override the defaults of :meth:`mpi_options`).
            extra_args: further mpirun arguments, placed before ``cmd``.
            hostfile: hostfile to use; the cluster's :attr:`hostfile` when None (the
                :attr:`nodefile` also works). Not together with ``hosts``.
            hosts: run only on these host indices (``--host ADDR:SLOTS,...``), e.g. ``[0]``
                to restart on the survivor after :meth:`kill_host`; None: every host.
            oversubscribe: allow more ranks than slots.
            timeout_s: if given, mpirun is sent SIGTERM after this many seconds (SIGKILL 5 s
                later), so a stalled job (Horovod stalls rather than fails) is reaped inside
                the cluster; must be > 0.
            cwd: working directory of mpirun and the ranks; the caller's when None.
        """
        used = list(range(self.hosts_count))
        if hosts is not None:
            if hostfile is not None:
                raise ValueError("give hostfile or hosts, not both")
            used = self._check_host_indices(hosts)
        slots = len(used) * self.slots
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
        argv += ["mpirun", "--allow-run-as-root", *self.mpi_options(mca=mca)]
        if hosts is not None:
            argv += ["--host", ",".join(f"{self.hosts[i].address}:{self.slots}" for i in used)]
        else:
            argv += ["--hostfile", str(hostfile if hostfile is not None else self.hostfile)]
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
        return self.exec_cmd(used[0], argv, cwd=cwd)

    def net_bytes(self, index: int) -> dict[str, int]:
        """Bytes and packets host ``index`` has sent and received on its cable (``eth0``).

        Read from the host's network namespace counters, so it counts exactly the traffic
        between hosts (shared-memory and loopback traffic never reaches ``eth0``).

        Returns:
            ``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}``.
        """
        h = self.host(index)
        out = _run(["ip", "-n", h.netns, "-s", "-j", "link", "show", "eth0"])
        stats = json.loads(out)[0]["stats64"]
        return {
            "tx_bytes": int(stats["tx"]["bytes"]),
            "rx_bytes": int(stats["rx"]["bytes"]),
            "tx_packets": int(stats["tx"]["packets"]),
            "rx_packets": int(stats["rx"]["packets"]),
        }

    def kill_host(self, index: int) -> list[int]:
        """Kill every process on host ``index`` (node loss), holder included.

        The host's namespace and cable stay, as when a node's processes all die; the host
        can no longer run anything until the cluster is rebuilt.

        Returns:
            The pids that were sent SIGKILL.
        """
        h = self.host(index)
        killed = _kill_netns_processes(h.netns)
        logger.info("killed host %s: %d process(es)", h.name, len(killed))
        proc = self._holders.get(index)
        if proc is not None:
            proc.wait(timeout=_KILL_WAIT_S)
            del self._holders[index]
        return killed

    def host_alive(self, index: int) -> bool:
        """Whether host ``index``'s holder still runs in the host's network namespace."""
        h = self.host(index)
        pid = self.holder_pids.get(index)
        return pid is not None and pid in netns_pids(h.netns)

    def status(self) -> dict[str, Any]:
        """A JSON-able description: hosts, liveness, process counts, files."""
        present = set(list_netns())
        hosts = []
        for h in self.hosts:
            exists = h.netns in present
            hosts.append(
                {
                    "index": h.index,
                    "name": h.name,
                    "address": h.address,
                    "netns": h.netns,
                    "exists": exists,
                    "alive": exists and self.host_alive(h.index),
                    "holder_pid": self.holder_pids.get(h.index),
                    "processes": len(netns_pids(h.netns)) if exists else 0,
                }
            )
        return {
            "prefix": self.prefix,
            "up": all(x["exists"] for x in hosts) and self.bridge_netns in present,
            "bridge_netns": self.bridge_netns,
            "slots": self.slots,
            "scratch": str(self.scratch) if self.scratch is not None else None,
            "state_dir": str(self.state_dir),
            "agent": str(self.agent_path),
            "hostfile": str(self.hostfile),
            "nodefile": str(self.nodefile),
            "up_seconds": self.up_seconds,
            "hosts": hosts,
        }


# ---- CLI ---------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="netns_cluster.py", description=__doc__.split("\n\n")[0] if __doc__ else None
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
    """``demo``: narrate :func:`netns_demo.run_node_loss_drill` on a cluster of its own."""
    # Imported here: the drill imports mlbfgs_hpc, which the other subcommands do not need.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import netns_demo

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
