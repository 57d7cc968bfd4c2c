"""torch's rules for parameters without gradient and frozen parameters, on 2 ranks under a
real ``mpirun`` (issue 35): every gradient path equals one process.

The worker (``mpi_scripts/parity_worker.py``) trains a trunk with three heads: ``never``
has no gradient on any rank (idle: untouched, no pair), ``rank0_head`` has one on rank 0
only (rank 1 counts zeros, so it trains as the single process's global-batch gradient says),
and the trunk is frozen at construction, unfrozen at step 6, frozen at 12, unfrozen at 18.
Tolerance as in ``test_distributed.py`` (float64, rank-order sums: ≤ 1e-15 measured).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.mpi_helpers import SCRIPTS, assert_same_params, mpirun

WORKER = str(SCRIPTS / "parity_worker.py")
ATOL = 1e-10
VARIANTS = ["horovod:allreduce", "horovod:reducescatter", "mpi:allreduce", "mpi:reducescatter"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    single = tmp_path_factory.mktemp("single")
    mpirun(0, [WORKER, "--out", str(single), "--variants", "mpi:allreduce"], timeout=300)
    ranks = tmp_path_factory.mktemp("p2")
    mpirun(2, [WORKER, "--out", str(ranks), "--variants", *VARIANTS], timeout=400)
    return {"single": single / "mpi-allreduce",
            **{v: ranks / v.replace(":", "-") for v in VARIANTS}}


def _records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]


def test_single_process_follows_the_rules(runs: dict[str, Path]) -> None:
    (record,) = _records(runs["single"])
    assert record["never_untouched"] and record["trunk_untouched_while_frozen"]
    assert record["grad_steps"] == {"trunk": [18, 18], "main": [30, 30],
                                    "rank0_head": [30, 30], "never": [0, 0]}
    assert record["pairs"]["never"] == 0 and record["pairs"]["main"] > 0
    assert record["moved"] == ["main", "rank0_head", "trunk"]
    assert record["copy_refusal"] is None          # one process: the copy works


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_ranks_equal_one_process(runs: dict[str, Path], variant: str) -> None:
    single = torch.load(runs["single"] / "params.pt")
    params = torch.load(runs[variant] / "params.pt")
    assert_same_params(single, params, atol=ATOL)
    (reference,) = _records(runs["single"])
    records = _records(runs[variant])
    assert [r["rank"] for r in records] == [0, 1]
    grad_steps: dict[str, list[int]] = {}
    pairs: dict[str, int] = {}
    for record in records:
        assert record["never_untouched"] and record["trunk_untouched_while_frozen"]
        assert record["counters"]["step"] == 30
        assert record["counters"]["accepted_pairs"] == reference["counters"]["accepted_pairs"]
        assert record["counters"]["rejected_pairs"] == reference["counters"]["rejected_pairs"]
        assert "state_dict()" in record["copy_refusal"]
        grad_steps.update(record["grad_steps"])
        pairs.update(record["pairs"])
    # Each block's counts from its owner: rank0_head took part at every step (rank 1 had
    # no gradient, rank 0 had one), the unused head at none.
    assert grad_steps == reference["grad_steps"] and pairs == reference["pairs"]
    # The head used on rank 0 only did train (as one process with the global batch does,
    # the parameters above), the unused one did not.
    assert all(r["moved"] == ["main", "rank0_head", "trunk"] for r in records)
