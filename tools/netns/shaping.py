"""Links that behave like a cluster's: a rate limit (``tc`` ``tbf``) and optionally a one-way
latency (``tc`` ``netem``) on every cable of a namespace cluster.

A veth cable moves data as fast as memory copies (tens of Gbit/s) with microseconds of
latency, so without shaping the network costs nothing and communication savings never show.
Each cable gets the same qdisc at both ends: on the host's ``eth0`` (what it sends) and on its
bridge port ``pN`` (what it receives), as a full-duplex NIC of that rate would behave::

    host nA: eth0 ──[tbf rate R]──►  pA ─┐
                                          br0 (bridge namespace)
    host nB: eth0 ◄──[tbf rate R]──  pB ─┘

``tbf``'s bucket holds a 64 KiB segmentation-offload packet or one millisecond at the rate,
whichever is more (a smaller bucket drops such packets outright), and its queue holds
``QUEUE_LATENCY`` of traffic so that TCP backs off instead of losing packets (a drop behind
the sender's own counter would count a retransmission twice in the byte counts).

``netem`` (latency) is a separate kernel module (``sch_netem``); where the kernel lacks it,
asking for a latency fails with :class:`~.system.ClusterError` saying so, and a rate alone
still works.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

from .system import ClusterError

__all__ = ["LinkShape", "parse_rate", "probe_throughput", "tc_commands"]

_RATE_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kmg]?)bit$")
_DELAY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(us|ms|s)$")
_UNIT = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
#: Queue of the rate limiter, in time at the rate (``tbf latency``).
QUEUE_LATENCY = "200ms"
_MIN_BURST_BYTES = 128 * 1024


def parse_rate(rate: str) -> float:
    """Bits per second of a ``tc`` rate such as ``1gbit``, ``100mbit``, ``500kbit``.

    Raises:
        ValueError: not of that form, or zero.
    """
    match = _RATE_RE.match(rate) if isinstance(rate, str) else None
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"rate must look like '1gbit', '100mbit' or '500kbit', got {rate!r}")
    return float(match.group(1)) * _UNIT[match.group(2)]


def _check_delay(delay: str) -> None:
    if not isinstance(delay, str) or not _DELAY_RE.match(delay):
        raise ValueError(f"delay must look like '50us', '0.5ms' or '1s', got {delay!r}")


class LinkShape:
    """A link's rate and latency.

    Args:
        rate: ``tc`` rate (``1gbit``, ``10gbit``, ``100mbit``) or ``None`` (unlimited).
        delay: one-way latency added by ``netem`` (``100us``, ``1ms``) or ``None``.

    Raises:
        ValueError: a malformed rate or delay, or neither given.
    """

    def __init__(self, *, rate: str | None = None, delay: str | None = None) -> None:
        if rate is None and delay is None:
            raise ValueError("give a rate, a delay or both")
        if rate is not None:
            parse_rate(rate)
        if delay is not None:
            _check_delay(delay)
        self.rate, self.delay = rate, delay

    def to_dict(self) -> dict[str, str | None]:
        return {"rate": self.rate, "delay": self.delay}

    def __repr__(self) -> str:
        return f"LinkShape(rate={self.rate!r}, delay={self.delay!r})"


def tc_commands(dev: str, shape: LinkShape | None) -> list[list[str]]:
    """``tc`` argv lists (without the namespace prefix) that give ``dev`` this shape; with
    ``None``, the one that removes any shape (its failure, "no qdisc", is harmless)."""
    if shape is None:
        return [["tc", "qdisc", "del", "dev", dev, "root"]]
    cmds: list[list[str]] = []
    parent = ["root"]
    if shape.delay is not None:
        cmds.append(["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "netem",
                     "delay", shape.delay, "limit", "100000"])
        parent = ["parent", "1:"]
    if shape.rate is not None:
        burst = max(_MIN_BURST_BYTES, int(parse_rate(shape.rate) / 8 / 1000))  # 1 ms at rate
        verb = "add" if shape.delay is not None else "replace"
        cmds.append(["tc", "qdisc", verb, "dev", dev, *parent, "handle", "2:", "tbf",
                     "rate", shape.rate, "burst", str(burst), "latency", QUEUE_LATENCY])
    return cmds


def explain_failure(exc: ClusterError, shape: LinkShape) -> ClusterError:
    """A clearer error when the kernel lacks the qdisc asked for."""
    text = str(exc)
    if "unknown" in text.lower() and shape.delay is not None and "netem" in text:
        return ClusterError(f"this kernel has no netem qdisc (module sch_netem), so a link "
                            f"latency ({shape.delay}) cannot be added; a rate alone works. "
                            f"({text})")
    return exc


_RECEIVER = """
import socket, sys, time
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((sys.argv[1], int(sys.argv[2]))); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept(); total = 0; start = None
while True:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    if start is None:
        start = time.perf_counter()
    total += len(chunk)
print(total, time.perf_counter() - start, flush=True)
"""
_SENDER = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(bytes(int(sys.argv[3]))); s.close()
"""


def probe_throughput(cluster: Any, *, src: int, dst: int, nbytes: int = 4 << 20,
                     port: int = 47001, timeout: float = 60.0) -> float:
    """Bits per second of one TCP stream from host ``src`` to host ``dst`` (``nbytes`` of
    zeros, timed by the receiver from its first byte to the end)."""
    address = cluster.host(dst).address
    receiver = subprocess.Popen(
        cluster.exec_cmd(dst, [sys.executable, "-c", _RECEIVER, address, str(port)]),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "listening":
            raise ClusterError(f"throughput probe: no receiver on {address}")
        subprocess.run(cluster.exec_cmd(src, [sys.executable, "-c", _SENDER, address,
                                              str(port), str(nbytes)]),
                       check=True, capture_output=True, timeout=timeout)
        out, _ = receiver.communicate(timeout=timeout)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    received, seconds = out.split()
    if int(received) != nbytes:
        raise ClusterError(f"throughput probe: sent {nbytes} bytes, {received} arrived")
    return 8 * nbytes / float(seconds)
