"""A namespace cluster: N hosts joined by a bridge, ready for ``mpirun`` across them
(:class:`NetnsCluster`: build it, use it, tear it down)."""

from __future__ import annotations

import json
import logging
import os
import selectors
import shlex
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import mpi
from .scripts import agent_script, holder_script
from .shaping import LinkShape, explain_failure, tc_commands
from .system import (
    ADDRESS_BASE,
    CMD_TIMEOUT_S,
    DEFAULT_PREFIX,
    HOLDER_READY_TIMEOUT_S,
    KILL_WAIT_S,
    MAX_HOSTS,
    MAX_SLOTS,
    SIZE_RE,
    STATE_FILE,
    ClusterError,
    Host,
    default_state_dir,
    kill_netns_processes,
    list_netns,
    netns_pids,
    prefix_netns_re,
    run_cmd,
    teardown_prefix,
    validate_prefix,
)

logger = logging.getLogger(__name__)


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
        link_rate: str | None = None,
        link_delay: str | None = None,
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
            link_rate: rate of every cable, a ``tc`` rate such as ``1gbit`` (``None``:
                unlimited); see :mod:`.shaping` and :meth:`shape`.
            link_delay: one-way latency of every cable, e.g. ``100us`` (needs the kernel's
                ``netem``); ``None``: none.
        """
        if not isinstance(hosts, int) or not 1 <= hosts <= MAX_HOSTS:
            raise ValueError(f"hosts must be an int in [1, {MAX_HOSTS}], got {hosts!r}")
        if not isinstance(slots, int) or not 1 <= slots <= MAX_SLOTS:
            raise ValueError(f"slots must be an int in [1, {MAX_SLOTS}], got {slots!r}")
        validate_prefix(prefix)
        if not SIZE_RE.match(scratch_size):
            raise ValueError(
                f"scratch_size must be a positive size like '256m' or '1g', got {scratch_size!r}"
            )
        self.hosts_count = hosts
        self.slots = slots
        self.prefix = prefix
        self.scratch_size = scratch_size
        self.link = (LinkShape(rate=link_rate, delay=link_delay)
                     if link_rate is not None or link_delay is not None else None)
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
                address=f"{ADDRESS_BASE}{i + 1}",
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
        pattern = prefix_netns_re(self.prefix)
        existing = [n for n in list_netns() if pattern.match(n)]
        if existing or (self.state_dir / STATE_FILE).exists():
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
        run_cmd(["ip", "netns", "add", self.bridge_netns])
        self._disable_ipv6(self.bridge_netns)
        run_cmd(["ip", "-n", self.bridge_netns, "link", "add", "br0", "type", "bridge"])
        run_cmd(["ip", "-n", self.bridge_netns, "link", "set", "lo", "up"])
        run_cmd(["ip", "-n", self.bridge_netns, "link", "set", "br0", "up"])
        for h in self.hosts:
            run_cmd(["ip", "netns", "add", h.netns])
            self._disable_ipv6(h.netns)
            port = f"p{h.index}"
            # Created directly between the two namespaces: no interface ever exists in the
            # root namespace, not even for an instant.
            run_cmd(
                ["ip", "-n", self.bridge_netns, "link", "add", port, "type", "veth",
                 "peer", "name", "eth0", "netns", h.netns]
            )  # fmt: skip
            run_cmd(["ip", "-n", self.bridge_netns, "link", "set", port, "master", "br0", "up"])
            run_cmd(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0"])
            run_cmd(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            run_cmd(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
        if self.link is not None:
            self._apply_shape(self.link)
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
        run_cmd(["ip", "netns", "exec", netns, "sh", "-c", script], check=False)

    def _make_scratch_dir(self, path: Path) -> None:
        # Remember each directory we create so teardown can remove exactly those.
        missing: list[Path] = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        self.created_dirs.extend(str(m) for m in reversed(missing))

    def _start_holder(self, h: Host) -> None:
        log_path = self.state_dir / f"{h.netns}.holder.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", h.netns, "unshare", "--mount", "--uts",
                 "--propagation", "slave", "sh", "-c",
                 holder_script(h, hosts_file=self.state_dir / "hosts", scratch=self.scratch,
                               scratch_size=self.scratch_size, prefix=self.prefix)],
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
            if sel.select(timeout=HOLDER_READY_TIMEOUT_S):
                line = proc.stdout.readline()
        # `sleep infinity` never writes, so closing our end of the pipe is harmless.
        proc.stdout.close()
        if line.strip() != b"ready":
            proc.kill()
            proc.wait(timeout=CMD_TIMEOUT_S)
            raise ClusterError(
                f"holder for {h.name} did not start (rc={proc.returncode}): "
                f"{log_path.read_text(errors='replace').strip()}"
            )
        # ip netns exec, unshare and sh all exec, so the Popen pid is the holder itself.
        self.holder_pids[h.index] = proc.pid
        (self.state_dir / f"{h.netns}.pid").write_text(f"{proc.pid}\n")

    def _write_agent(self) -> None:
        self.agent_path.write_text(agent_script(self.hosts, state_dir=self.state_dir,
                                                prefix=self.prefix))
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
            "link": self.link.to_dict() if self.link is not None else None,
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / STATE_FILE)

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
        validate_prefix(prefix)
        sd = Path(state_dir) if state_dir is not None else default_state_dir(prefix)
        try:
            state = json.loads((sd / STATE_FILE).read_text())
        except FileNotFoundError as exc:
            raise ClusterError(f"no cluster {prefix!r} (no {sd / STATE_FILE})") from exc
        cluster = cls(
            hosts=state["hosts"],
            slots=state["slots"],
            prefix=state["prefix"],
            scratch=state["scratch"],
            scratch_size=state["scratch_size"],
            state_dir=state["state_dir"],
            link_rate=(state.get("link") or {}).get("rate"),
            link_delay=(state.get("link") or {}).get("delay"),
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
        """The ``--mca`` options that make Open MPI (run on a host) use this cluster
        (see :func:`.mpi.mpi_options`)."""
        return mpi.mpi_options(self, mca=mca)

    def mpirun_cmd(self, np: int, cmd: Sequence[str], **options: Any) -> list[str]:
        """Command line that launches ``cmd`` on ``np`` ranks across the hosts (see
        :func:`.mpi.mpirun_cmd` for the options: env, forward, mca, extra_args, hostfile,
        hosts, oversubscribe, timeout_s, cwd)."""
        return mpi.mpirun_cmd(self, np, cmd, **options)

    def shape(self, *, rate: str | None = None, delay: str | None = None) -> None:
        """Give every cable this rate and/or latency (both ends), or none when both are
        ``None``; takes effect at once on a running cluster.

        Raises:
            ValueError: a malformed rate or delay.
            ClusterError: ``tc`` failed, e.g. a latency on a kernel without ``netem``.
        """
        link = None if rate is None and delay is None else LinkShape(rate=rate, delay=delay)
        try:
            self._apply_shape(link)
        except ClusterError:
            self._apply_shape(self.link)  # leave every cable as it was, not half-changed
            raise
        self.link = link
        self._write_state()
        logger.info("cluster %s links: %s", self.prefix, link or "unlimited")

    def _apply_shape(self, link: LinkShape | None) -> None:
        for h in self.hosts:
            for netns, dev in ((h.netns, "eth0"), (self.bridge_netns, f"p{h.index}")):
                # Start from no qdisc, so a rate-only shape never sits under an old netem.
                run_cmd(["ip", "netns", "exec", netns, *tc_commands(dev, None)[0]], check=False)
                for argv in tc_commands(dev, link) if link is not None else []:
                    try:
                        run_cmd(["ip", "netns", "exec", netns, *argv])
                    except ClusterError as exc:
                        raise explain_failure(exc, link) from exc

    def qdiscs(self, index: int) -> str:
        """``tc qdisc show`` of host ``index``'s cable end (``eth0``)."""
        return run_cmd(["ip", "netns", "exec", self.host(index).netns, "tc", "qdisc", "show",
                        "dev", "eth0"])

    def net_bytes(self, index: int) -> dict[str, int]:
        """Bytes and packets host ``index`` has sent and received on its cable (``eth0``).

        Read from the host's network namespace counters, so it counts exactly the traffic
        between hosts (shared-memory and loopback traffic never reaches ``eth0``).

        Returns:
            ``{"tx_bytes", "rx_bytes", "tx_packets", "rx_packets"}``.
        """
        h = self.host(index)
        out = run_cmd(["ip", "-n", h.netns, "-s", "-j", "link", "show", "eth0"])
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
        killed = kill_netns_processes(h.netns)
        logger.info("killed host %s: %d process(es)", h.name, len(killed))
        proc = self._holders.get(index)
        if proc is not None:
            proc.wait(timeout=KILL_WAIT_S)
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
            "link": self.link.to_dict() if self.link is not None else None,
            "hosts": hosts,
        }
