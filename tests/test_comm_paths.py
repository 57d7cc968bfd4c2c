"""The gradient/update paths without a launcher: host-major plans (``comm.topology``), the
reducer's and optimizer's argument checks, the CLI flags. The paths themselves run under real
``mpirun`` in ``test_distributed.py`` (one host) and ``test_multinode.py`` (two hosts)."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from mlbfgs_hpc import MLBFGS, Ownership, build_blocks, cli
from mlbfgs_hpc.cli import UsageError, launcher_rank, validate_train_args
from mlbfgs_hpc.comm import GradientReducer, HostLayout, LocalCommunicator, node_plan
from mlbfgs_hpc.train import build_parser


# ---- host layouts and host-major plans ----------------------------------------------------------
def test_by_slot_placement_needs_no_packing() -> None:
    layout = HostLayout((0, 0, 1, 1))
    assert (layout.hosts, layout.max_ranks_per_host, layout.node_aware_pays) == (2, 2, True)
    plan = node_plan(layout, counts=[3, 4, 2, 6], offsets=[0, 3, 7, 9])
    assert plan.identity and plan.moves() == []
    assert plan.packed_offsets == (0, 3, 7, 9)
    assert (plan.host_offsets, plan.host_counts) == ((0, 7), (7, 8))
    assert (plan.local_counts(1), plan.local_displs(1)) == ([2, 6], [0, 2])


def test_round_robin_placement_is_packed_host_major() -> None:
    # --map-by node: ranks 0, 2 on host 0; 1, 3 on host 1 (the module docstring's picture).
    layout = HostLayout((0, 1, 0, 1))
    plan = node_plan(layout, counts=[3, 4, 2, 6], offsets=[0, 3, 7, 9])
    assert not plan.identity
    assert plan.local_ranks == ((0, 2), (1, 3))
    assert plan.packed_offsets == (0, 5, 3, 9)  # r0 | r2 | r1 | r3
    assert (plan.host_offsets, plan.host_counts) == ((0, 5), (5, 10))
    assert (plan.local_counts(0), plan.local_displs(0)) == ([3, 2], [0, 3])
    assert plan.moves() == [(0, 0, 3), (3, 5, 4), (7, 3, 2), (9, 9, 6)]
    # Packing then unpacking with the moves is the identity on any vector.
    natural = torch.arange(15.0)
    packed = torch.empty(15)
    for nat, pck, c in plan.moves():
        packed[pck:pck + c] = natural[nat:nat + c]
    assert packed[:5].tolist() == [0, 1, 2, 7, 8]  # host 0's run: r0's slice, then r2's
    back = torch.empty(15)
    for nat, pck, c in plan.moves():
        back[nat:nat + c] = packed[pck:pck + c]
    assert torch.equal(back, natural)


def test_uneven_hosts_and_ranks_that_own_nothing() -> None:
    layout = HostLayout((0, 0, 0, 1))
    assert layout.ranks_of(0) == (0, 1, 2) and layout.ranks_of(1) == (3,)
    own = Ownership.build(block_numels=[5, 5], world_size=4)  # ranks 2, 3 own nothing
    plan = node_plan(layout, counts=own.counts, offsets=own.offsets)
    assert plan.identity
    assert plan.host_counts == (10, 0) and plan.local_counts(0) == [5, 5, 0]
    assert not HostLayout((0, 0)).node_aware_pays  # one host: nothing crosses a network
    assert not HostLayout((0, 1)).node_aware_pays  # one rank per host: nothing to combine


@pytest.mark.parametrize("hosts", [(), (1, 0), (0, 2), (0, -1), (0, True)])
def test_host_numbering_is_checked(hosts: tuple) -> None:
    with pytest.raises(ValueError, match="host_of_rank"):
        HostLayout(hosts)


def test_plan_rejects_tables_that_are_not_ownership_slices() -> None:
    layout = HostLayout((0, 1))
    with pytest.raises(ValueError, match="one per rank"):
        node_plan(layout, counts=[1, 2, 3], offsets=[0, 1, 3])
    with pytest.raises(ValueError, match="contiguous"):
        node_plan(layout, counts=[2, 2], offsets=[0, 3])


# ---- argument checks ------------------------------------------------------------------------------
def _named() -> list[tuple[str, torch.Tensor]]:
    return [("w", nn.Parameter(torch.zeros(3))), ("b", nn.Parameter(torch.zeros(2)))]


def test_reducer_rejects_bad_mode_and_missing_ownership() -> None:
    comm = LocalCommunicator()
    with pytest.raises(ValueError, match="^mode must be"):
        GradientReducer(comm=comm, named_params=_named(), mode="gather")  # type: ignore
    with pytest.raises(ValueError, match="needs the ownership table"):
        GradientReducer(comm=comm, named_params=_named(), mode="reducescatter")
    wrong = Ownership.build(block_numels=[4], world_size=1)
    with pytest.raises(ValueError, match="5 elements, 1 ranks"):
        GradientReducer(comm=comm, named_params=_named(), mode="reducescatter",
                        ownership=wrong)


def test_one_process_reduce_scatter_leaves_the_gradient_in_grad() -> None:
    named = _named()
    reducer = GradientReducer(comm=LocalCommunicator(), named_params=named,
                              mode="reducescatter",
                              ownership=Ownership.build(block_numels=[3, 2], world_size=1))
    named[0][1].grad = torch.ones(3)
    reducer.synchronize()
    assert reducer.owned_grad is None and not reducer.node_aware
    assert torch.equal(named[0][1].grad, torch.ones(3))


@pytest.mark.parametrize("value", ["reduce", "", "ReduceScatter"])
def test_optimizer_rejects_unknown_grad_reduce(value: str) -> None:
    with pytest.raises(ValueError, match="^grad_reduce must be"):
        MLBFGS([nn.Parameter(torch.zeros(3))], grad_reduce=value)  # type: ignore[arg-type]


def test_one_process_paths_give_the_same_step() -> None:
    results = []
    for reduce, node in [("allreduce", None), ("reducescatter", None), ("reducescatter", True)]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
        opt = MLBFGS(model.parameters(), blocks=build_blocks(model), grad_reduce=reduce,
                     node_aware=node)
        assert opt.node_aware is False  # one process: nothing to combine
        model(torch.ones(2, 4)).sum().backward()
        opt.step()
        results.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert all(torch.equal(results[0], r) for r in results[1:])


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def test_cli_defaults_and_reduce_scatter_only_for_mlbfgs() -> None:
    args = _args()
    assert (args.grad_reduce, args.node_aware, args.grad_backend) == ("allreduce", "auto",
                                                                      "auto")
    validate_train_args(_args("--optimizer", "sgd"))  # the baselines allreduce by default
    validate_train_args(_args("--grad-reduce", "reducescatter", "--node-aware", "off"))
    with pytest.raises(UsageError, match="--grad-reduce reducescatter needs --optimizer "
                                         "mlbfgs.*not adam"):
        validate_train_args(_args("--optimizer", "adam", "--grad-reduce", "reducescatter"))
    with pytest.raises(SystemExit):
        _args("--node-aware", "yes")


@pytest.mark.parametrize(("env", "rank"), [
    ({}, 0),
    ({"SLURM_PROCID": "3"}, 3),                                    # srun without PMIx's rank
    ({"OMPI_COMM_WORLD_RANK": "2", "SLURM_PROCID": "0"}, 2),       # mpirun inside a batch job
    ({"PMIX_RANK": "5", "SLURM_PROCID": "5"}, 5),                  # srun --mpi=pmix
    # horovodrun (Gloo) from a batch script: every process inherits the script's SLURM_PROCID.
    ({"HOROVOD_RANK": "1", "SLURM_PROCID": "0"}, 1),
    ({"OMPI_COMM_WORLD_RANK": "1", "HOROVOD_RANK": "1", "SLURM_PROCID": "0"}, 1),
    ({"SLURM_PROCID": "not-a-rank"}, 0),
])
def test_launcher_rank_reads_the_launcher_that_started_the_process(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], rank: int) -> None:
    """The rank that decides who prints a usage error, before any communicator exists."""
    for name in cli._RANK_VARIABLES:   # the list launcher_rank reads, so none leaks in
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launcher_rank() == rank


# ---- the package's own import graph -------------------------------------------------------------
def _comm_imports() -> dict[str, set[str]]:
    """Module -> the ``mlbfgs_hpc.comm`` modules it imports, anywhere in the file (module
    level, functions, ``TYPE_CHECKING`` blocks)."""
    import ast
    from pathlib import Path

    import mlbfgs_hpc.comm as package

    root = Path(package.__file__).parent
    names = {p.stem for p in root.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {}
    for name in names:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level == 1 and module.split(".")[0] in names:
                    found.add(module.split(".")[0])
                elif module.startswith("mlbfgs_hpc.comm."):
                    found.add(module.split(".")[2])
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[2] for a in node.names
                          if a.name.startswith("mlbfgs_hpc.comm.")}
        graph[name] = found
    return graph


def test_comm_modules_import_one_way() -> None:
    """No cycle among ``mlbfgs_hpc.comm``'s modules, not even through a lazy or a
    type-checking import: communicator -> reducer -> paths/overlapped -> protocol ->
    topology."""
    graph = _comm_imports()
    assert graph["communicator"] >= {"reducer", "topology"}
    assert {"paths", "overlapped"} <= graph["reducer"]
    assert "communicator" not in graph["reducer"] | graph["paths"] | graph["overlapped"]
    state: dict[str, str] = {}

    def visit(module: str, path: tuple[str, ...]) -> None:
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", f"import cycle: {' -> '.join(path + (module,))}"
        state[module] = "open"
        for child in sorted(graph[module]):
            visit(child, path + (module,))
        state[module] = "done"

    for module in sorted(graph):
        visit(module, ())
