"""Multi-rank checkpoint tests under real ``mpirun`` (``tests/mpi_scripts/ckpt_worker.py``).

* 4 ranks: save at step 10, restart from it in a new job, run to 20: bitwise identical to
  the uninterrupted 4-rank run, every rank's own torch RNG stream restored.
* Resume on another world size: 4 -> 2 (Horovod gradients), 4 -> 1, 1 -> 3. The re-sharded
  state is bitwise the saved one (``mlbfgs-ckpt diff`` of the 4-rank checkpoint and the state
  re-saved right after loading on 2 ranks reports no difference), but the continued
  trajectory matches only to floating-point reduction order: the gradient average (one sum of
  p partial gradients, in the order of the MPI/Horovod allreduce algorithm, versus one sum over
  the whole batch on one rank) and gᵀd (summed over per-rank partial dot products in rank
  order) round differently. Measured over 10 float64 steps: max |Δθ| ≈ 1e-16 (≈ 1e-14
  relative). We assert ``rtol=1e-9, atol=1e-11``: a few orders of magnitude of head room, far
  below any real divergence (a wrong block or a lost history ring moves θ by ≥ 1e-4).
* A damaged shard read by only one rank raises the same CheckpointCorruptError on every rank
  (no hang); a run directory on node-local storage is refused with the host and path named.

Each mpirun has a timeout that fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mlbfgs_hpc import checkpoint as ckpt
from tests.ckpt_helpers import tool_main
from tests.mpi_helpers import load_module, mpi_env

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "mpi_scripts" / "ckpt_worker.py"
PYTHON = sys.executable
RTOL, ATOL = 1e-9, 1e-11

pytestmark = pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")


worker = load_module("ckpt_worker_mpi", WORKER)


def mpirun(n: int, args: list[str], *, timeout: float = 150,
           wrapper: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the worker on ``n`` ranks; a timeout kills the whole job and fails the test."""
    cmd = ["mpirun", "-np", str(n), *(wrapper or []), PYTHON, str(WORKER), *args]
    proc = subprocess.Popen(cmd, env=mpi_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"mpirun -np {n} timed out after {timeout} s (hang?):\n{out[-3000:]}")
    assert proc.returncode == 0, f"mpirun -np {n} failed ({proc.returncode}):\n{out[-3000:]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def params(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "params.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def record(out: Path, rank: int) -> dict[str, Any]:
    return json.loads((out / f"rank{rank}.json").read_text())


def assert_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, exact: bool) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact:
            assert np.array_equal(a[name], b[name]), name
        else:
            np.testing.assert_allclose(b[name], a[name], rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.fixture(scope="module")
def four_rank_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 4-rank run to step 20, checkpoints at 10 and 20 (3 blocks, rank 3 none)."""
    base = tmp_path_factory.mktemp("four")
    mpirun(4, ["--run-dir", str(base / "run"), "--out", str(base / "out"), "--steps", "20",
               "--save-at", "10,20"])
    return base


def test_four_rank_restart_is_bit_identical(four_rank_run: Path, tmp_path: Path) -> None:
    ckpt10 = four_rank_run / "run" / "checkpoints" / "step-000010"
    manifest = json.loads((ckpt10 / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and [s["blocks"] for s in manifest["shards"]] == [
        [0], [1], [2], []]
    mpirun(4, ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
               "--steps", "20", "--resume", str(ckpt10)])
    assert_params(params(four_rank_run / "out"), params(tmp_path / "out"), exact=True)
    for rank in range(4):
        ref, res = record(four_rank_run / "out", rank), record(tmp_path / "out", rank)
        assert res["loaded"] == {"step": 10, "world_size": 4, "path": str(ckpt10)}
        assert ref["probes"]["10"] == res["probes"]["10"], f"rank {rank} torch RNG"
        assert ref["counters"] == res["counters"] and ref["counters"]["accepted_pairs"] == 15
    probes = [tuple(record(tmp_path / "out", r)["probes"]["10"]) for r in range(4)]
    assert len(set(probes)) == 4  # each rank really has its own stream


def test_four_to_two_ranks_and_damaged_shard_on_one_rank(four_rank_run: Path,
                                                         tmp_path: Path) -> None:
    ckpt10 = four_rank_run / "run" / "checkpoints" / "step-000010"
    damaged = Path(shutil.copytree(ckpt10, tmp_path / "damaged" / "step-000010"))
    shard2 = damaged / "shard-00002-of-00004.h5"  # block 2: read by rank 1 of 2 only
    with shard2.open("r+b") as fh:
        fh.seek(shard2.stat().st_size - 100)
        fh.write(b"\0" * 8 if fh.read(8) != b"\0" * 8 else b"\1" * 8)
    mpirun(2, ["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
               "--steps", "20", "--resume", str(ckpt10), "--backend", "horovod",
               "--expect-error-from", str(damaged), "--resave-dir", str(tmp_path / "resaved")])
    for rank in range(2):
        rec = record(tmp_path / "out", rank)
        error = rec["errors"]["damaged"]
        assert error is not None and error.startswith("CheckpointCorruptError")
        assert "failed on 1 of 2 ranks" in error and f"{shard2} fails its sha256" in error
        assert rec["loaded"]["world_size"] == 4
        ref = record(four_rank_run / "out", rank)
        assert rec["probes"]["10"] == ref["probes"]["10"], f"rank {rank} torch RNG"
    assert record(tmp_path / "out", 1)["owned_blocks"] == [1, 2]
    # Re-sharded from 4 to 2 shards, the state is bitwise what was saved.
    assert tool_main(["diff", str(ckpt10), str(tmp_path / "resaved")]) == 0
    assert_params(params(four_rank_run / "out"), params(tmp_path / "out"), exact=False)


def test_four_to_one_rank(four_rank_run: Path, tmp_path: Path) -> None:
    ckpt10 = four_rank_run / "run" / "checkpoints" / "step-000010"
    rec = worker.run(["--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                      "--steps", "20", "--resume", str(ckpt10), "--save-at", "20"])
    assert rec["loaded"]["world_size"] == 4 and rec["owned_blocks"] == [0, 1, 2]
    assert rec["probes"]["10"] == record(four_rank_run / "out", 0)["probes"]["10"]
    assert_params(params(four_rank_run / "out"), params(tmp_path / "out"), exact=False)
    # The tolerance is far below what the 10 resumed steps changed.
    with ckpt.CheckpointReader(path=ckpt10) as reader:
        at10 = {k: v.numpy() for k, v in reader.model_state().items()}
    final = params(tmp_path / "out")
    assert max(np.abs(final[k] - at10[k]).max() for k in final) > 1e4 * ATOL
    # The tool compares per block across shard layouts: equal within tolerance, not bitwise.
    ref20 = four_rank_run / "run" / "checkpoints" / "step-000020"
    assert tool_main(["diff", "--atol", "1e-9", str(ref20), str(tmp_path / "run")]) == 0
    assert tool_main(["diff", str(ref20), str(tmp_path / "run")]) == 1


def test_one_to_three_ranks(tmp_path: Path) -> None:
    worker.run(["--run-dir", str(tmp_path / "run1"), "--out", str(tmp_path / "out1"),
                "--steps", "20", "--save-at", "10"])
    ckpt10 = tmp_path / "run1" / "checkpoints" / "step-000010"
    # "auto": rank 0 picks the newest valid checkpoint of the run directory, all ranks agree.
    mpirun(3, ["--run-dir", str(tmp_path / "run1"), "--out", str(tmp_path / "out3"),
               "--steps", "20", "--resume", "auto", "--backend", "horovod"])
    probe = record(tmp_path / "out1", 0)["probes"]["10"]
    for rank in range(3):
        rec = record(tmp_path / "out3", rank)
        assert rec["loaded"] == {"step": 10, "world_size": 1, "path": str(ckpt10)}
        assert rec["owned_blocks"] == [rank]
        assert rec["probes"]["10"] == probe  # rank r gets saved rank r % 1
    assert_params(params(tmp_path / "out1"), params(tmp_path / "out3"), exact=False)


def _can_unshare() -> bool:
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10)
    return probe.returncode == 0


def test_node_local_storage_is_refused(tmp_path: Path) -> None:
    """Each rank gets a private tmpfs at the run directory, like node-local scratch."""
    if shutil.which("unshare") is None or not _can_unshare():
        pytest.skip("needs unshare -m (mount namespaces) to emulate node-local storage")
    run = tmp_path / "scratch"
    run.mkdir()
    shell = (f"mount -t tmpfs tmpfs {run} && exec {PYTHON} {WORKER} --run-dir {run} "
             f"--out {tmp_path / 'out'} --steps 2 --save-at 2 --visibility-wait 0.5")
    cmd = ["mpirun", "-np", "2", "unshare", "-m", "sh", "-c", shell]
    proc = subprocess.Popen(cmd, env=mpi_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"node-local run hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    for rank in range(2):
        error = record(tmp_path / "out", rank)["errors"]["save"]
        assert error.startswith("CheckpointStorageError"), error
        assert "is not visible to rank 1 on host" in error and str(run) in error
        assert "shared by all ranks" in error
    assert ckpt.list_checkpoints(run) == []
