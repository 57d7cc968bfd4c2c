"""Multi-rank mL-BFGS under a real ``mpirun``: equivalence with one process, ownership,
gradient backends, failure propagation and NaN handling.

Tolerance: the workers run in float64. A p-rank run differs from the single process only in
the order of floating-point additions (the gradient average over ranks and the rank-ordered
sum of gᵀd), i.e. relative errors of a few ulp (≈1e-16) per step, carried through 30 steps.
We measured ≤ 3e-16 here; ``atol = 1e-10`` leaves six orders of margin for other BLAS/MPI
reduction orders while any real defect (a lost block, a wrong slice, a rank using stale
state) shows up as ≥ 1e-3.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from mlbfgs_hpc import Ownership
from tests.mpi_helpers import SCRIPTS, assert_same_params, mpirun

WORKER = str(SCRIPTS / "dist_worker.py")
ATOL = 1e-10
BLOCK_NUMELS = (16 * 32 + 32, 32 * 24 + 24, 24 * 4 + 4)  # the worker's three Linear layers
RUNS = {  # name: (ranks, extra args); 0 ranks = plain python, no launcher
    "single": (0, []),
    "p2_horovod": (2, ["--backend", "horovod"]),
    "p2_mpi": (2, ["--backend", "mpi"]),
    "p3_horovod": (3, ["--backend", "horovod"]),
    # Horovod's padded reducescatter after the backward pass (grad_overlap=False).
    "p2_horovod_after": (2, ["--backend", "horovod", "--after"]),
    "p4_mpi": (4, ["--backend", "mpi"]),
    "single_nan": (0, ["--nan-step", "7"]),
    "p3_nan": (3, ["--nan-step", "7", "--backend", "mpi"]),
    # Double damping runs per block on its owner, at pair time (H·y from the block's ring).
    "single_dd": (0, ["--double-damping", "0.5"]),
    "p3_dd": (3, ["--double-damping", "0.5", "--backend", "mpi"]),
    # One step length for the whole direction: its factor needs every rank's block norms.
    "single_gg": (0, ["--clip", "graft-global"]),
    "p3_gg": (3, ["--clip", "graft-global", "--backend", "mpi"]),
    # Per-group outer momentum (weights 0.5, then 0 for a while; biases 0.9): each rank
    # applies its owned segments' own μ.
    "single_gm": (0, ["--group-momentum"]),
    "p3_gm": (3, ["--group-momentum", "--backend", "mpi"]),
    # Gradient clipping to a global norm: inside the step (3 ranks, reduce-scatter: each
    # rank holds only its slice), and by the user with torch's clip_grad_norm_ between
    # optimizer.synchronize() and step() (2 ranks, Horovod allreduce from the hooks).
    "single_cn": (0, ["--max-grad-norm", "0.3"]),
    "p3_cn": (3, ["--max-grad-norm", "0.3", "--backend", "mpi"]),
    "p2_uc": (2, ["--user-clip", "0.3", "--grad-reduce", "allreduce"]),
    # Mixed-precision loss scaling (torch.amp.GradScaler, scale 2**8: exact in float64)
    # with the poisoned batch of single_nan: the scaler must skip that step on every rank.
    "p2_gs": (2, ["--grad-scaler", "--nan-step", "7", "--grad-reduce", "allreduce"]),
    # The middle block (792 elements) on the direct (GEMV) H·g path, owned by rank 1 of 3.
    "single_di": (0, ["--direct-min-numel", "600"]),
    "p3_di": (3, ["--direct-min-numel", "600", "--backend", "mpi"]),
    # The default gradient path is the reduce-scatter (node-aware off on one host); the others
    # in one job: the allreduce, and the node-aware collectives forced on (one host: the
    # intra-host steps alone, with an inter-host step among one leader).
    # ":after": Horovod's reduce-scatter after the backward pass (the default sends each
    # owner's slice from the hooks).
    "p4_paths": (4, ["--variants", "horovod:allreduce:off", "mpi:allreduce:off",
                     "horovod:reducescatter:on", "mpi:reducescatter:on",
                     "horovod:allreduce:on", "horovod:reducescatter:off:after"]),
}
P4_PATHS = ["horovod-allreduce-off", "mpi-allreduce-off", "horovod-reducescatter-on",
            "mpi-reducescatter-on", "horovod-allreduce-on", "horovod-reducescatter-off-after"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, (ranks, extra) in RUNS.items():
        out[name] = tmp_path_factory.mktemp(name)
        mpirun(ranks, [WORKER, "--out", str(out[name]), *extra], timeout=300)
    return out


def _params(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "params.pt")


def _records(run: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(run.glob("rank*.json"))]


@pytest.mark.parametrize("name", ["p2_horovod", "p2_mpi", "p3_horovod", "p4_mpi",
                                  "p2_horovod_after"])
def test_p_ranks_equal_single_process(runs: dict[str, Path], name: str) -> None:
    assert_same_params(_params(runs["single"]), _params(runs[name]), atol=ATOL)
    single = _records(runs["single"])[0]["counters"]
    for record in _records(runs[name]):
        assert record["counters"]["accepted_pairs"] == single["accepted_pairs"] > 0


@pytest.mark.parametrize("path", P4_PATHS)
def test_every_gradient_path_equals_single_process(runs: dict[str, Path], path: str) -> None:
    run = runs["p4_paths"] / path
    assert_same_params(_params(runs["single"]), _params(run), atol=ATOL)
    single = _records(runs["single"])[0]["counters"]
    for record in _records(run):
        assert record["node_aware"] == ("-on" in path)
        assert record["grad_reduce"] == path.split("-")[1]
        assert record["counters"] == single | {"last_nu": record["counters"]["last_nu"],
                                               "last_gamma": record["counters"]["last_gamma"]}


@pytest.mark.parametrize("variant", ["dd", "gg", "gm", "cn"])
def test_option_on_p_ranks_equals_single_process(runs: dict[str, Path], variant: str) -> None:
    """An option that changes the trajectory ends, on 3 ranks, where one process does.

    ``dd``: double damping's μ1 = 0.5 (the other runs use the default 0.2) changes the pairs,
    and each rank damps only the blocks it owns. ``gg``: ``clip="graft-global"`` scales every
    block by ONE factor from the norms of all blocks; each of the 3 ranks owns one of the 3
    blocks, so a factor from a rank's own blocks would end elsewhere than one process does.
    ``gm``: two param groups with their own outer momentum, changed mid-run, applied by each
    rank to the segments of its blocks. ``cn``: ``max_grad_norm``, whose factor needs the
    norm over every rank's slice.
    """
    with_option = _params(runs[f"single_{variant}"])
    assert_same_params(with_option, _params(runs[f"p3_{variant}"]), atol=ATOL)
    default = _params(runs["single"])
    assert max((with_option[k] - default[k]).abs().max().item() for k in with_option) > 1e-6
    single = _records(runs[f"single_{variant}"])[0]["counters"]
    for record in _records(runs[f"p3_{variant}"]):
        assert record["counters"]["accepted_pairs"] == single["accepted_pairs"] > 0


def test_user_clipping_after_synchronize_equals_clipping_in_the_step(
        runs: dict[str, Path]) -> None:
    """``optimizer.synchronize()`` then torch's ``clip_grad_norm_`` on 2 Horovod ranks (the
    hooks' allreduce finished, so ``.grad`` is the average everywhere and ``step()`` does not
    average again) ends where one process clipping inside the step does."""
    assert_same_params(_params(runs["single_cn"]), _params(runs["p2_uc"]), atol=ATOL)


def test_grad_scaler_after_synchronize_equals_the_unscaled_single_process(
        runs: dict[str, Path]) -> None:
    """torch's GradScaler on 2 Horovod ranks, with ``optimizer.synchronize()`` before its
    ``unscale_``: every rank sees the averaged gradient, so all skip the poisoned step and
    back the scale off together (2**8 -> 2**7), and the run ends where one process without
    loss scaling, skipping that step itself, does (scaling by powers of 2 is exact)."""
    assert_same_params(_params(runs["single_nan"]), _params(runs["p2_gs"]), atol=ATOL)
    for record in _records(runs["p2_gs"]):
        assert record["grad_scale"] == 2.0 ** 7
        assert record["counters"]["step"] == 29 and record["counters"]["skipped_steps"] == 0


def test_direct_block_on_p_ranks_equals_single_process_and_the_chunked_step(
        runs: dict[str, Path]) -> None:
    """A block on the direct (GEMV) path steps on 3 ranks as in one process, and as the
    all-chunked step does (the same operator: float64 rounding apart)."""
    assert [r["direct_blocks"] for r in _records(runs["single_di"])] == [[1]]
    assert sorted(b for r in _records(runs["p3_di"]) for b in r["direct_blocks"]) == [1]
    assert all(r["direct_blocks"] == [] for r in _records(runs["single"]))
    direct = _params(runs["single_di"])
    assert_same_params(direct, _params(runs["p3_di"]), atol=ATOL)
    assert_same_params(_params(runs["single"]), direct, atol=ATOL)
    single = _records(runs["single"])[0]["counters"]
    assert _records(runs["single_di"])[0]["counters"]["accepted_pairs"] == \
        single["accepted_pairs"] > 0


def test_horovod_reduce_scatter_starts_in_the_hooks_unless_told_not_to(
        runs: dict[str, Path]) -> None:
    """The default Horovod reduce-scatter is the per-owner alltoall launched from the
    backward hooks; ``grad_overlap=False`` gives the padded reducescatter after the pass.
    Both equal one process (the tests above); here: each run took the path it names."""
    records = _records(runs["p3_horovod"])
    owners = sum(1 for record in records if record["owned_blocks"])
    for record in records:
        assert record["overlap"] is True
        assert record["gradient_path"] == ("reducescatter (horovod alltoall to each owner, "
                                           "from the backward hooks)")
        # Every owner's slice left from a hook, none waited for synchronize().
        assert record["runs_sent_during_backward"] == owners == 3
    for record in _records(runs["p2_horovod_after"]):
        assert record["overlap"] is False
        assert record["gradient_path"].startswith("reducescatter (horovod, padded to 2 x ")
        assert record["runs_sent_during_backward"] is None
    for record in _records(runs["p4_paths"] / "horovod-reducescatter-off-after"):
        assert record["overlap"] is False
        # The padded reducescatter, or (this MLP's slices are uneven enough) the Horovod
        # allreduce that replaces it when the padding would exceed twice the model.
        assert "padded to 4 x " in record["gradient_path"], record["gradient_path"]
        assert record["runs_sent_during_backward"] is None


def test_horovod_and_mpi_backends_agree(runs: dict[str, Path]) -> None:
    assert_same_params(_params(runs["p2_horovod"]), _params(runs["p2_mpi"]), atol=ATOL)


@pytest.mark.parametrize("name", ["single", "p2_mpi", "p3_horovod", "p4_mpi"])
def test_each_rank_holds_only_its_blocks(runs: dict[str, Path], name: str) -> None:
    records = _records(runs[name])
    size = len(records)
    ownership = Ownership.build(block_numels=BLOCK_NUMELS, world_size=size)
    owned_everywhere: list[int] = []
    for record in records:
        assert record["size"] == size
        expected = list(ownership.blocks_of(record["rank"]))
        assert record["owned_blocks"] == expected
        owned_everywhere += expected
        for block, numels in record["state_numel"].items():
            n = BLOCK_NUMELS[int(block)]
            assert numels["m_param"] == numels["momentum_buffer"] == n
            assert numels["S"] == numels["Y"] == 10 * n
    assert sorted(owned_everywhere) == list(range(len(BLOCK_NUMELS)))
    if size > 1:  # per-rank memory falls: no rank holds the single process's state
        single_bytes = _records(runs["single"])[0]["state_bytes"]
        assert max(r["state_bytes"] for r in records) < single_bytes


def test_owners_differ_with_p_but_not_the_result(runs: dict[str, Path]) -> None:
    owners = {name: [r["owned_blocks"] for r in _records(runs[name])]
              for name in ("p2_mpi", "p3_horovod")}
    assert owners["p2_mpi"] != owners["p3_horovod"]
    assert_same_params(_params(runs["p2_mpi"]), _params(runs["p3_horovod"]), atol=ATOL)


def test_nan_on_one_rank_is_handled_identically_everywhere(runs: dict[str, Path]) -> None:
    for record in _records(runs["p3_nan"]):
        assert record["counters"]["skipped_steps"] == 1
        assert record["counters"]["step"] == 29
    assert _records(runs["single_nan"])[0]["counters"]["skipped_steps"] == 1
    assert_same_params(_params(runs["single_nan"]), _params(runs["p3_nan"]), atol=ATOL)
    # Skipping really changed the trajectory (the poisoned batch was not used).
    assert not torch.allclose(_params(runs["single_nan"])["0.weight"],
                              _params(runs["single"])["0.weight"])


def test_a_rank_that_raises_aborts_the_job(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = mpirun(3, [WORKER, "--out", str(tmp_path), "--raise-on-rank", "1"],
                  timeout=120, check=False)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr + proc.stdout
    assert not (tmp_path / "params.pt").exists()
    assert elapsed < 120
