"""The system side of a namespace cluster: its constants, the ``ip``/``kill`` commands it
runs, and :func:`teardown_prefix`, which removes every trace of a cluster by name alone."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: The only addresses this tool ever assigns or lets Open MPI use: link-local, on cables
#: between namespaces this tool created.
SUBNET = "169.254.77.0/24"
ADDRESS_BASE = "169.254.77."
MAX_HOSTS = 64
MAX_SLOTS = 256
DEFAULT_PREFIX = "mlbfgs"
#: Prefix of the cluster ``demo`` builds, so it never collides with one brought up by ``up``.
DEMO_PREFIX = "mlbdemo"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
SIZE_RE = re.compile(r"^[1-9][0-9]*[kmgKMG]?$")
STATE_FILE = "cluster.json"
NETNS_RUN_DIR = Path("/run/netns")
# Bounds for the system commands the tool runs; none of them should take more than a blink.
CMD_TIMEOUT_S = 30.0
HOLDER_READY_TIMEOUT_S = 20.0
KILL_WAIT_S = 10.0


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


def run_cmd(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT_S) -> str:
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
    out = run_cmd(["ip", "netns", "list"])
    # Lines look like "name" or "name (id: 3)".
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def netns_pids(netns: str) -> list[int]:
    """Pids of every process whose network namespace is ``netns`` (``ip netns pids``)."""
    out = run_cmd(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in out.split() if tok.isdigit()]


def prefix_netns_re(prefix: str) -> re.Pattern[str]:
    # Exact shape, so prefix "a" never matches another cluster named "a-b".
    return re.compile(rf"^{re.escape(prefix)}-(n[0-9]+|br)$")


def default_state_dir(prefix: str) -> Path:
    """Where a cluster with ``prefix`` keeps its agent, host files and state by default."""
    return Path(tempfile.gettempdir()) / f"netns-cluster-{prefix}"


def validate_prefix(prefix: str) -> None:
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise ValueError(
            "prefix must be 1-32 chars of lowercase letters, digits and '-', starting with a "
            f"letter, got {prefix!r}"
        )


def kill_netns_processes(netns: str, *, wait_s: float = KILL_WAIT_S) -> list[int]:
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
    for state_path in Path(tempfile.gettempdir()).glob(f"netns-cluster-*/{STATE_FILE}"):
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
    validate_prefix(prefix)
    state_dir = Path(state_dir) if state_dir is not None else default_state_dir(prefix)
    state: dict[str, Any] = {}
    state_path = state_dir / STATE_FILE
    if state_path.is_file():
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as exc:
            logger.warning("unreadable state %s (%s); cleaning by name only", state_path, exc)
    pattern = prefix_netns_re(prefix)
    # Hosts first so no process is left talking while the bridge goes away.
    names = sorted((n for n in list_netns() if pattern.match(n)), key=lambda n: n.endswith("-br"))
    for name in names:
        killed = kill_netns_processes(name)
        if killed:
            logger.info("killed %d process(es) in %s", len(killed), name)
        run_cmd(["ip", "netns", "del", name])
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
