"""Pytest fixtures for a namespace multi-host cluster (``tools/netns``).

``managed_cluster`` brings a cluster up and guarantees it goes away: on normal exit, on a
failing test, on Ctrl-C (pytest runs fixture finalizers on KeyboardInterrupt), on SIGTERM or
SIGHUP (turned into KeyboardInterrupt while the cluster is up) and, as a last resort, at
interpreter exit. A run killed with SIGKILL cannot clean up; the next run removes its
leftovers (``cleanup_stale``), since prefixes carry the owning pid.

Use in a test module::

    from netns_fixture import netns_cluster  # noqa: F401  (the fixture)

    def test_x(netns_cluster): ...

Set ``NETNS_CLUSTER_PREFIX`` to choose the prefix (default ``mlbt<pid>``).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import pytest

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
_STALE_RE = re.compile(r"^mlbt([0-9]+)[a-z]*-(?:n[0-9]+|br)$")


def _load_tool() -> ModuleType:
    # The source tree's tools/netns, also in child pythons that only have tests/ on their path.
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return importlib.import_module("tools.netns")


netns_cluster_mod = _load_tool()
NetnsCluster = netns_cluster_mod.NetnsCluster


def default_prefix() -> str:
    """``$NETNS_CLUSTER_PREFIX``, else ``mlbt<pid>`` (unique among concurrent runs)."""
    return os.environ.get("NETNS_CLUSTER_PREFIX") or f"mlbt{os.getpid()}"


def netns_unavailable_reason() -> str | None:
    """Why namespace clusters cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "unshare", "nsenter", "mpirun"):
        if shutil.which(tool) is None:
            return f"{tool} not found"
    return None


def require_netns() -> None:
    """Skip the calling test if namespaces are unavailable; fail instead under CI=true."""
    reason = netns_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"namespace cluster unavailable in CI: {reason}")
    pytest.skip(reason)


def cleanup_stale() -> list[str]:
    """Remove clusters left by earlier test runs (``mlbt<pid>...``) whose process is gone."""
    removed: list[str] = []
    prefixes: set[str] = set()
    for name in netns_cluster_mod.list_netns():
        match = _STALE_RE.match(name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            prefixes.add(name.rsplit("-", 1)[0])
    for prefix in sorted(prefixes):
        removed += netns_cluster_mod.teardown_prefix(prefix)
    if removed:
        logger.warning("removed stale namespaces of crashed test runs: %s", removed)
    return removed


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def managed_cluster(**kwargs: Any) -> Iterator[Any]:
    """Bring up ``NetnsCluster(**kwargs)`` and always tear it down.

    Args:
        **kwargs: passed to :class:`NetnsCluster`; ``prefix`` defaults to
            :func:`default_prefix`.

    Yields:
        The running cluster.
    """
    kwargs.setdefault("prefix", default_prefix())
    cluster = NetnsCluster(**kwargs)
    # Leftovers of a crashed run with this very prefix (e.g. a fixed NETNS_CLUSTER_PREFIX).
    cluster.down()
    cleanup_stale()
    atexit.register(cluster.down)
    old_handlers: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            # Only where nobody installed a handler: default SIGTERM would skip all cleanup.
            if signal.getsignal(sig) is signal.SIG_DFL:
                old_handlers[sig] = signal.signal(sig, _raise_interrupt)
    try:
        cluster.up()
        yield cluster
    finally:
        try:
            cluster.down()
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            atexit.unregister(cluster.down)


@pytest.fixture(scope="module")
def netns_cluster() -> Iterator[Any]:
    """A 2-host x 2-slot cluster with node-local scratch, shared by a test module."""
    require_netns()
    prefix = default_prefix()
    with managed_cluster(
        hosts=2, slots=2, prefix=prefix, scratch=f"/tmp/{prefix}-scratch/local"
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def netns_cluster_session() -> Iterator[Any]:
    """Like :func:`netns_cluster`, shared by the whole session (prefix suffix ``s``)."""
    require_netns()
    prefix = default_prefix() + "s"
    with managed_cluster(
        hosts=2, slots=2, prefix=prefix, scratch=f"/tmp/{prefix}-scratch/local"
    ) as cluster:
        yield cluster
