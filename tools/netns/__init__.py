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

Used as a library (``from tools.netns import NetnsCluster``, or ``mlbfgs_hpc_tools.netns``
installed) by ``tests/netns_fixture.py`` and as a CLI::

    python tools/netns_cluster.py up --hosts 2 --slots 2 [--scratch /scratch/local] \
        [--rate 1gbit] [--delay 100us]
    python tools/netns_cluster.py shape --rate 10gbit   # or --off: change a running cluster
    python tools/netns_cluster.py status
    python tools/netns_cluster.py run [--host 1] -- hostname
    python tools/netns_cluster.py mpirun -np 4 -- hostname
    python tools/netns_cluster.py mpirun --on 0 -- hostname    # only on host 0
    python tools/netns_cluster.py mpi-args          # mpirun options for a job script's mpirun
    python tools/netns_cluster.py kill 1
    python tools/netns_cluster.py down
    python tools/netns_cluster.py demo    # own cluster: train on 2 hosts, lose one, resume

The parts, one module each:

===========  ==================================================================================
``system``   constants, the ``ip``/``kill`` commands, :func:`teardown_prefix` (clean-up by name)
``scripts``  the generated shell scripts: a host's holder and the rsh agent
``cluster``  :class:`NetnsCluster`: build (namespaces, bridge, cables, holders), use, tear down
``mpi``      Open MPI on the cluster: ``--mca`` settings and the ``mpirun`` command line
``cli``      the command line (``tools/netns_cluster.py`` is its entry script)
``demo``     the node-loss drill behind ``demo``
``slurm``    a real multi-node SLURM (one slurmd per host) on such a cluster
``shaping``  links that cost something: ``tc`` rate (``tbf``) and latency (``netem``) per cable
===========  ==================================================================================

Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), iproute2, util-linux (unshare, nsenter).
"""

from __future__ import annotations

from . import shaping
from .cluster import NetnsCluster
from .system import (
    DEFAULT_PREFIX,
    DEMO_PREFIX,
    SUBNET,
    ClusterError,
    Host,
    default_state_dir,
    list_netns,
    netns_pids,
    teardown_prefix,
)

__all__ = ["NetnsCluster", "shaping", "ClusterError", "Host", "teardown_prefix", "list_netns",
           "netns_pids", "default_state_dir", "SUBNET", "DEFAULT_PREFIX", "DEMO_PREFIX"]
