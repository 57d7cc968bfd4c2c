"""Tests of the namespace multi-host cluster (``tools/netns_cluster.py``) with real mpirun.

Every command that could hang runs under a subprocess timeout that fails the test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from netns_fixture import (  # noqa: F401  (netns_cluster is a fixture)
    REPO_ROOT,
    NetnsCluster,
    default_prefix,
    managed_cluster,
    netns_cluster,
    netns_cluster_mod,
    require_netns,
)

PY = sys.executable
MPI_ENV = {
    **os.environ,
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMP_NUM_THREADS": "1",
}
# Generous per-command bounds: a 4-rank job here starts in ~2 s.
MPI_TIMEOUT_S = 120
HOST_CMD_TIMEOUT_S = 30


def run_on(cluster: Any, index: int, argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cluster.exec_cmd(index, argv),
        capture_output=True,
        text=True,
        timeout=HOST_CMD_TIMEOUT_S,
        env=MPI_ENV,
    )


def run_mpi(
    cluster: Any, np: int, cmd: list[str], **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    # mpirun's own timeout (inside host 0) reaps a stalled job; the outer one fails the test.
    argv = cluster.mpirun_cmd(np, cmd, timeout_s=MPI_TIMEOUT_S - 20, **kwargs)
    return subprocess.run(argv, capture_output=True, text=True, timeout=MPI_TIMEOUT_S, env=MPI_ENV)


def prefix_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return [
        line.split()[0]
        for line in out.splitlines()
        if line.startswith(f"{prefix}-")
    ]


# ---- argument validation (no root needed) -------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "argname"),
    [
        ({"hosts": 0}, "hosts"),
        ({"hosts": 65}, "hosts"),
        ({"slots": 0}, "slots"),
        ({"prefix": "Bad_Prefix"}, "prefix"),
        ({"scratch": "relative/path"}, "scratch"),
        ({"scratch": "/"}, "scratch"),
        ({"scratch": "/tmp", "state_dir": "/tmp/x-state"}, "scratch"),
        ({"scratch_size": "lots"}, "scratch_size"),
    ],
)
def test_bad_arguments_raise_valueerror_naming_them(kwargs: dict[str, Any], argname: str) -> None:
    with pytest.raises(ValueError, match=argname):
        NetnsCluster(**kwargs)


def test_mpirun_cmd_validates_np_and_restricts_traffic_to_the_subnet() -> None:
    cluster = NetnsCluster(hosts=2, slots=2, prefix="mlbtcmd")
    with pytest.raises(ValueError, match="np"):
        cluster.mpirun_cmd(5, ["true"])
    with pytest.raises(ValueError, match="host index"):
        cluster.exec_cmd(2, ["true"])
    argv = cluster.mpirun_cmd(5, ["true"], oversubscribe=True, env={"FOO": "1"}, cwd="/")
    assert argv[:2] == [str(cluster.agent_path), "169.254.77.1"]
    script = argv[2]
    assert script.startswith("cd / && exec mpirun --allow-run-as-root")
    for needle in (
        "--mca btl_tcp_if_include 169.254.77.0/24",
        "--mca oob_tcp_if_include 169.254.77.0/24",
        f"--mca plm_rsh_agent {cluster.agent_path}",
        "-np 5",
        "--oversubscribe",
        "-x PATH",
        "-x FOO=1",
        "-x OMP_NUM_THREADS=",
    ):
        assert needle in script


# ---- shaped links (tools/netns/shaping.py) -----------------------------------------------
shaping = netns_cluster_mod.shaping


def test_link_shape_arguments_and_tc_commands() -> None:
    assert shaping.parse_rate("1gbit") == 1e9 and shaping.parse_rate("2.5mbit") == 2.5e6
    for bad in ("1gbps", "fast", "0mbit", "-1gbit", 10):
        with pytest.raises(ValueError, match="rate must look like"):
            shaping.parse_rate(bad)
    with pytest.raises(ValueError, match="delay must look like"):
        shaping.LinkShape(delay="5 ms")
    with pytest.raises(ValueError, match="give a rate, a delay or both"):
        shaping.LinkShape()
    with pytest.raises(ValueError, match="rate must look like"):
        NetnsCluster(prefix="mlbtshape", link_rate="1GB")
    # A rate alone: one tbf at the root, its bucket >= 1 ms at the rate and >= 128 KiB.
    (tbf,) = shaping.tc_commands("eth0", shaping.LinkShape(rate="10gbit"))
    assert tbf[:7] == ["tc", "qdisc", "replace", "dev", "eth0", "root", "handle"]
    assert tbf[tbf.index("rate") + 1] == "10gbit"
    assert int(tbf[tbf.index("burst") + 1]) == 10**10 // 8 // 1000
    (tbf,) = shaping.tc_commands("p0", shaping.LinkShape(rate="100mbit"))
    assert int(tbf[tbf.index("burst") + 1]) == 128 * 1024
    # With a latency: netem at the root, the rate limiter under it.
    netem, tbf = shaping.tc_commands("eth0", shaping.LinkShape(rate="1gbit", delay="100us"))
    assert netem[netem.index("delay") + 1] == "100us" and "root" in netem
    assert tbf[2] == "add" and tbf[tbf.index("parent") + 1] == "1:"
    assert shaping.tc_commands("eth0", None) == [["tc", "qdisc", "del", "dev", "eth0", "root"]]


def test_shaped_links_limit_the_rate_and_can_be_changed() -> None:
    """100 Mbit/s on every cable end: tbf on each host's eth0 and bridge port, and a TCP
    stream between the hosts never faster than the rate (an upper bound: load on the
    machine can only slow it further)."""
    require_netns()
    with managed_cluster(hosts=2, slots=1, prefix=default_prefix() + "q",
                         link_rate="100mbit") as cluster:
        for h in cluster.hosts:
            assert "tbf" in cluster.qdiscs(h.index) and "rate 100Mbit" in cluster.qdiscs(
                h.index)
        port = subprocess.run(["ip", "netns", "exec", cluster.bridge_netns, "tc", "qdisc",
                               "show", "dev", "p1"], capture_output=True, text=True,
                              timeout=HOST_CMD_TIMEOUT_S).stdout
        assert "tbf" in port and "rate 100Mbit" in port
        assert NetnsCluster.load(prefix=cluster.prefix).link.rate == "100mbit"
        rates = [shaping.probe_throughput(cluster, src=s, dst=1 - s, nbytes=3 << 20)
                 for s in (0, 1)]
        assert all(1e6 < r <= 1.1e8 for r in rates), rates
        # A latency needs netem: applied where the kernel has it, else a clear error that
        # leaves the links as they were.
        try:
            cluster.shape(rate="100mbit", delay="1ms")
        except netns_cluster_mod.ClusterError as exc:
            assert "netem" in str(exc)
            assert "rate 100Mbit" in cluster.qdiscs(0) and cluster.link.delay is None
        else:
            assert "netem" in cluster.qdiscs(0) and "delay 1" in cluster.qdiscs(0)
        cluster.shape()  # unlimited again
        assert "tbf" not in cluster.qdiscs(0) and cluster.link is None
        assert NetnsCluster.load(prefix=cluster.prefix).link is None


# ---- a running cluster ------------------------------------------------------------------
def test_hosts_have_own_name_address_and_no_route_out(netns_cluster: Any) -> None:
    c = netns_cluster
    assert c.hostfile.read_text() == "169.254.77.1 slots=2\n169.254.77.2 slots=2\n"
    assert c.nodefile.read_text().split() == [c.hosts[0].name] * 2 + [c.hosts[1].name] * 2
    for h in c.hosts:
        r = run_on(c, h.index, ["sh", "-c", "hostname; ip -4 -o addr show; ip route; ip -6 addr"])
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[0] == h.name
        addrs = [ln.split()[3] for ln in lines if " inet " in ln]
        assert sorted(addrs) == sorted(["127.0.0.1/8", f"{h.address}/24"])
        routes = [ln for ln in lines if ln.startswith(("default", "169.254.77.0/24"))]
        # Only the cluster subnet is reachable: no default route out of the host.
        assert routes == [next(ln for ln in lines if ln.startswith("169.254.77.0/24"))]
        assert "inet6" not in r.stdout  # IPv6 off: no fe80:: chatter on the cable
    st = c.status()
    assert st["up"] and all(h["alive"] for h in st["hosts"])


def _reports_two_per_host(r: Any, cluster: Any, report_dir: Path) -> list[dict[str, Any]]:
    """Each of 4 ranks' JSON report, checked: success, ranks 0-1 on host 0, 2-3 on host 1.

    The ranks write their reports to files on the shared file system rather than to stdout:
    mpirun forwards the ranks' output as it arrives, so two ranks' reports can interleave,
    even inside one line (CI saw it)."""
    assert r.returncode == 0, r.stdout + r.stderr
    reports = sorted(
        (json.loads(f.read_text()) for f in report_dir.glob("rank*.json")), key=lambda d: d["rank"]
    )
    assert [d["rank"] for d in reports] == [0, 1, 2, 3], r.stdout + r.stderr
    names = [h.name for h in cluster.hosts]
    assert [d["host"] for d in reports] == [names[0], names[0], names[1], names[1]]
    return reports


@pytest.mark.parametrize("which", ["hostfile", "nodefile"])
def test_mpi4py_allreduce_across_hosts(
    netns_cluster: Any, which: str, tmp_path: Path
) -> None:
    prog = textwrap.dedent(
        """
        import json, pathlib, socket, sys
        import numpy as np
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        send = np.array([comm.rank + 1.0, 2.0 ** comm.rank])
        recv = np.zeros(2)
        comm.Allreduce(send, recv, op=MPI.SUM)
        report = {"rank": comm.rank, "size": comm.size,
                  "host": socket.gethostname(), "sum": recv.tolist()}
        pathlib.Path(sys.argv[1], f"rank{comm.rank}.json").write_text(json.dumps(report))
        """
    )
    r = run_mpi(netns_cluster, 4, [PY, "-c", prog, str(tmp_path)],
                hostfile=getattr(netns_cluster, which))
    reports = _reports_two_per_host(r, netns_cluster, tmp_path)
    for d in reports:
        assert d["size"] == 4
        assert d["sum"] == [10.0, 15.0]  # 1+2+3+4 and 1+2+4+8


def test_horovod_allreduce_across_hosts(netns_cluster: Any, tmp_path: Path) -> None:
    try:
        import horovod.torch  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"horovod.torch must be installed in CI: {exc}")
        pytest.skip(f"horovod.torch not installed: {exc}")
    prog = textwrap.dedent(
        """
        import json, pathlib, socket, sys
        import torch
        import horovod.torch as hvd
        hvd.init()
        t = torch.tensor([hvd.rank() + 1.0, 2.0 ** hvd.rank()])
        s = hvd.allreduce(t, op=hvd.Sum, name="sum")
        report = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(),
                  "local_size": hvd.local_size(), "cross_size": hvd.cross_size(),
                  "host": socket.gethostname(), "sum": s.tolist()}
        pathlib.Path(sys.argv[1], f"rank{hvd.rank()}.json").write_text(json.dumps(report))
        hvd.shutdown()
        """
    )
    r = run_mpi(netns_cluster, 4, [PY, "-c", prog, str(tmp_path)], forward=["PYTHONPATH"])
    reports = _reports_two_per_host(r, netns_cluster, tmp_path)
    for d in reports:
        assert d["sum"] == [10.0, 15.0]
        # Horovod sees two nodes of two ranks each: distinct host names at work.
        assert (d["size"], d["local_size"], d["cross_size"]) == (4, 2, 2)
        assert d["local_rank"] == d["rank"] % 2


def test_scratch_is_node_local_and_shared_dir_is_shared(
    netns_cluster: Any, tmp_path: Path
) -> None:
    c = netns_cluster
    scratch = c.scratch
    assert scratch is not None
    mine = scratch / "from-n0.txt"
    shared = tmp_path / "shared-from-n0.txt"
    r = run_on(c, 0, ["sh", "-c", f"echo n0 > {mine} && echo n0 > {shared}"])
    assert r.returncode == 0, r.stderr
    # Host 0 keeps its scratch across commands (the holder keeps the mount alive) ...
    assert run_on(c, 0, ["cat", str(mine)]).stdout == "n0\n"
    # ... host 1 sees neither host 0's file, nor does the machine itself ...
    r1 = run_on(c, 1, ["sh", "-c", f"test -e {mine}; echo $?; cat {shared}"])
    assert r1.stdout.splitlines() == ["1", "n0"], r1.stderr
    assert not mine.exists()
    # ... while the shared file system is shared, as on a cluster.
    assert shared.read_text() == "n0\n"
    fs = run_on(c, 1, ["sh", "-c", f"grep ' {scratch} ' /proc/self/mountinfo"])
    assert " tmpfs " in fs.stdout
    root_mounts = Path("/proc/self/mountinfo").read_text()
    assert f" {scratch} " not in root_mounts


def test_kill_host_makes_mpirun_exit_nonzero_without_hang(
    record_property: Any, tmp_path: Path
) -> None:
    require_netns()
    # A cluster of its own: losing host 1 must not break the other tests' cluster.
    prefix = default_prefix() + "k"
    # Ranks mark their progress with files on the shared file system, not on stdout: mpirun
    # forwards the ranks' output as it arrives and CI saw two ranks' words interleave.
    prog = textwrap.dedent(
        """
        import pathlib, sys, time
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        marks = pathlib.Path(sys.argv[1])
        comm.Barrier()
        (marks / f"started.{comm.rank}").touch()
        for _ in range(3000):
            comm.Barrier()
            time.sleep(0.02)
        (marks / f"finished.{comm.rank}").touch()
        """
    )
    bound_s = 30.0
    with managed_cluster(hosts=2, slots=2, prefix=prefix) as c:
        proc = subprocess.Popen(
            c.mpirun_cmd(4, [PY, "-c", prog, str(tmp_path)], timeout_s=MPI_TIMEOUT_S),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=MPI_ENV,
        )
        try:
            deadline = time.monotonic() + 60
            while (len(list(tmp_path.glob("started.*"))) < 4 and proc.poll() is None
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            started = sorted(f.name for f in tmp_path.glob("started.*"))
            assert started == [f"started.{r}" for r in range(4)], (proc.poll(), started)
            time.sleep(1.0)  # ranks are now in their barrier loop
            t0 = time.monotonic()
            killed = c.kill_host(1)
            rc = proc.wait(timeout=bound_s + 30)
            detect_s = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        output = proc.stdout.read() if proc.stdout else ""
        record_property("node_loss_detect_s", round(detect_s, 3))
        print(f"\nnode loss: killed {len(killed)} processes; mpirun exited rc={rc} "
              f"after {detect_s:.2f}s")
        assert len(killed) >= 3, output  # holder, orted and its 2 ranks at least
        assert rc != 0, output
        assert detect_s < bound_s
        assert list(tmp_path.glob("finished.*")) == []
        assert not c.host_alive(1) and c.host_alive(0)
        # Host 0's ranks are gone too: only its holder is left in its namespace.
        assert netns_cluster_mod.netns_pids(c.hosts[0].netns) == [c.holder_pids[0]]
        r = subprocess.run(c.exec_cmd(1, ["true"]), capture_output=True, text=True, timeout=10)
        assert r.returncode == 255 and "down" in r.stderr
    assert prefix_namespaces(prefix) == []
    # The killed daemon's Open MPI session directory (named after its host) is gone too.
    assert list(Path(tempfile.gettempdir()).glob(f"ompi.{prefix}-*")) == []


def test_teardown_leaves_nothing_behind() -> None:
    require_netns()
    prefix = default_prefix() + "t"
    scratch = Path(f"/tmp/{prefix}-scratch/deep/local")
    t0 = time.monotonic()
    with managed_cluster(hosts=3, slots=1, prefix=prefix, scratch=scratch) as c:
        up_s = time.monotonic() - t0
        print(f"\n3-host cluster up in {up_s:.2f}s")
        assert sorted(prefix_namespaces(prefix)) == sorted(
            [f"{prefix}-br", f"{prefix}-n0", f"{prefix}-n1", f"{prefix}-n2"]
        )
        holders = list(c.holder_pids.values())
        state_dir = c.state_dir
        # Three hosts on one bridge: host 2 reaches host 0.
        r = run_on(c, 2, [PY, "-c",
                          "import socket\n"
                          "try:\n socket.create_connection(('169.254.77.1', 9), timeout=5)\n"
                          "except ConnectionRefusedError:\n print('refused')"])  # fmt: skip
        assert r.stdout.strip() == "refused", r.stderr  # an RST from host 0: it is reachable
    assert prefix_namespaces(prefix) == []
    assert not state_dir.exists()
    assert not Path(f"/tmp/{prefix}-scratch").exists()
    for pid in holders:
        assert not Path(f"/proc/{pid}").exists()
    assert str(scratch) not in Path("/proc/self/mountinfo").read_text()


def test_down_cli_cleans_crashed_run_and_is_idempotent() -> None:
    require_netns()
    prefix = default_prefix() + "c"
    tool = str(REPO_ROOT / "tools" / "netns_cluster.py")
    # A real crash: the process that built the cluster dies by SIGKILL, holders live on.
    crash = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from tools.netns import NetnsCluster
        NetnsCluster(prefix={prefix!r}, scratch="/tmp/{prefix}-scr").up()
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    r = subprocess.run([PY, "-c", crash], capture_output=True, text=True, timeout=60)
    assert r.returncode == -signal.SIGKILL
    try:
        assert len(prefix_namespaces(prefix)) == 3
        status = subprocess.run([PY, tool, "--prefix", prefix, "status"],
                                capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["up"] is True
        for _ in range(2):
            d = subprocess.run([PY, tool, "--prefix", prefix, "down"],
                               capture_output=True, text=True, timeout=60)
            assert d.returncode == 0, d.stderr
            assert prefix_namespaces(prefix) == []
        assert not Path(f"/tmp/{prefix}-scr").exists()
        assert not netns_cluster_mod.default_state_dir(prefix).exists()
    finally:
        netns_cluster_mod.teardown_prefix(prefix)


_CHILD_TEST = textwrap.dedent(
    """
    import os, time
    from netns_fixture import netns_cluster  # noqa: F401

    def test_child(netns_cluster):
        with open(os.environ["CHILD_MARK"], "w") as f:
            f.write("up")
        if os.environ["CHILD_MODE"] == "fail":
            # Fail only once the parent has seen the cluster up: failing at once would race
            # the fixture's teardown against the parent's namespace count.
            deadline = time.monotonic() + 60
            while not os.path.exists(os.environ["CHILD_GO"]) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert False, "deliberate failure"
        time.sleep(120)
    """
)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("mode", ["fail", "sigint", "sigterm"])
def test_fixture_tears_down_on_failure_and_interrupt(tmp_path: Path, mode: str) -> None:
    require_netns()
    prefix = default_prefix() + {"fail": "ff", "sigint": "fi", "sigterm": "ft"}[mode]
    (tmp_path / "test_child.py").write_text(_CHILD_TEST)
    mark = tmp_path / "mark"
    go = tmp_path / "go"
    pythonpath = os.pathsep.join([str(REPO_ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    env = {**MPI_ENV, "NETNS_CLUSTER_PREFIX": prefix, "CHILD_MODE": mode,
           "CHILD_MARK": str(mark), "CHILD_GO": str(go), "PYTHONPATH": pythonpath}
    proc = subprocess.Popen(
        [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
         "--rootdir", str(tmp_path), str(tmp_path / "test_child.py")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
        # A suite started in the background by a non-interactive shell (`tools/test.sh &`)
        # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler:
        # the child would sleep through the SIGINT this test sends. Start it at the default.
        preexec_fn=_default_sigint,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not mark.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert mark.exists(), "child never got its cluster"
        assert len(prefix_namespaces(prefix)) == 3  # the child's cluster is really up
        go.touch()
        if mode == "sigint":
            proc.send_signal(signal.SIGINT)
        elif mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        leftovers = prefix_namespaces(prefix)
        netns_cluster_mod.teardown_prefix(prefix)
    assert proc.returncode != 0, out
    if mode == "fail":
        assert "deliberate failure" in out
    assert leftovers == [], out
    assert not netns_cluster_mod.default_state_dir(prefix).exists()
