"""The line-searched ``MLBFGS`` on several ranks under a real ``mpirun``.

Each rank's closure returns the loss of its own shard; the optimizer averages losses and
gradients and takes every decision of the search on those rank-ordered sums, so every rank
evaluates the closure as often as one process does and the run ends where one process ends.
The workers run in float64: p ranks differ from one process only in the order of additions
(the gradient average; the rank sums of the dot products), measured ≤ 2e-11 relative here
after 15 iterations and 3e-7 after 60 (max_iter 20, three steps: L-BFGS amplifies round-off
along its iterations); a defect (a lost slice, a rank searching on its own loss, stale state) shows
up as 1e-3 or a hang, which the timeout turns into a failure.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.mpi_helpers import SCRIPTS, mpirun

WORKER = str(SCRIPTS / "searched_worker.py")
RUNS = {  # name: (ranks, worker args)
    "single": (0, []),
    "p2_horovod": (2, ["--backend", "horovod"]),
    "p2_mpi_rs": (2, ["--backend", "mpi", "--grad-reduce", "reducescatter"]),
    "p3_horovod_rs": (3, ["--backend", "horovod", "--grad-reduce", "reducescatter"]),
    "single_it": (0, ["--max-iter", "20", "--steps", "3"]),
    "p2_it": (2, ["--max-iter", "20", "--steps", "3"]),
    "single_beta": (0, ["--beta", "0.5"]),
    "p2_beta": (2, ["--beta", "0.5", "--backend", "mpi"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, (ranks, extra) in RUNS.items():
        out[name] = tmp_path_factory.mktemp(name)
        mpirun(ranks, [WORKER, "--out", str(out[name]), *extra], timeout=240)
    return out


def records(path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(path.glob("rank*.json"))]


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-3)).max()) for k in a)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("name", "reference", "rtol"), [
    ("p2_horovod", "single", 1e-9), ("p2_mpi_rs", "single", 1e-9),
    ("p3_horovod_rs", "single", 1e-9), ("p2_it", "single_it", 1e-5),
    ("p2_beta", "single_beta", 1e-9)])
def test_p_ranks_search_as_one_process(runs: dict[str, Path], name: str, reference: str,
                                       rtol: float) -> None:
    single, = records(runs[reference])
    ranks = records(runs[name])
    assert len(ranks) == RUNS[name][0]
    for record in ranks:   # every rank: the same evaluations and iterations as one process
        assert record["counters"]["func_evals"] == single["counters"]["func_evals"]
        assert record["counters"]["step"] == single["counters"]["step"]
        assert record["losses"] == pytest.approx(single["losses"], rel=rtol)
    assert single["counters"]["func_evals"] > single["counters"]["step"]   # it searched
    worst = max_relative_difference(torch.load(runs[reference] / "params.pt"),
                                    torch.load(runs[name] / "params.pt"))
    assert worst <= rtol, worst
    # The history is split: every block is owned by exactly one rank.
    owned = sorted(b for record in ranks for b in record["owned_blocks"])
    assert owned == single["owned_blocks"]


@pytest.mark.timeout(1200)
def test_the_history_is_split_over_the_ranks(runs: dict[str, Path]) -> None:
    # Each rank stores the history's columns of the blocks it owns (2·m per element, m = 20),
    # nothing else of it: one process's history is the sum of the ranks'.
    single, = records(runs["single"])
    for name in ("p2_horovod", "p3_horovod_rs"):
        ranks = records(runs[name])
        assert sum(r["history_elements"] for r in ranks) == single["history_elements"]
        for record in ranks:
            assert record["history_elements"] == 2 * 20 * record["owned_numel"]
            assert record["owned_numel"] < single["owned_numel"]
