"""Proof that the local SLURM/PBS test cluster (``tools/slurm_local.sh``) really works.

Each test runs real jobs on the single-node cluster: MPI ranks launched by ``srun --mpi=pmix``,
a PBS script submitted with ``qsub`` that runs ``mpirun`` on a ``generate_pbs_nodefile`` host
file, the ``--signal=USR1@N`` warning reaching every rank (srun-launched directly; mpirun-launched
through a ``B:`` signal forwarded from a trap), and a job requeueing itself and running again.
These are the mechanisms the jobs/ scripts and the checkpoint/requeue tests build on.

The two signal jobs are submitted by a module-scoped autouse fixture so their unavoidable
wait (Slurm sends the warning 0-30 s before the requested time, on a 30 s tick) overlaps the
other tests instead of adding to the module's runtime.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (fixture import)

logger = logging.getLogger(__name__)

PYTHON = sys.executable
# Open MPI refuses to run as root without these; one thread per rank on a 2-core box.
MPI_ENV_LINES = "export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1"
MPI_HELLO = (
    "from mpi4py import MPI; c = MPI.COMM_WORLD; "
    "total = c.allreduce(c.Get_rank()); "
    "print(f'rank {c.Get_rank()}/{c.Get_size()} sum={total}', flush=True)"
)

# --time=1 with the warning 20 s before the end: Slurm checks warn times on a ~30 s tick and
# sends the signal once fewer than N + 30 s remain, i.e. 20-50 s before the end (10-40 s after
# the start). A larger N would risk the signal firing at job start, before any rank listens.
SIGNAL_TIME_LIMIT_S = 60
SIGNAL_LEAD_S = 20
SIGNAL_WAIT_TIMEOUT_S = 120.0

# A rank that records when SIGUSR1 arrives, agrees with the others via an allreduce, and exits.
USR1_RANK = textwrap.dedent(
    """
    import signal, time
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    got = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: got.append(time.time()))
    print(f"rank {comm.Get_rank()} ready {time.time():.3f}", flush=True)
    while not comm.allreduce(1 if got else 0, op=MPI.MIN):
        time.sleep(0.2)
    print(f"rank {comm.Get_rank()}/{comm.Get_size()} SIGUSR1 {got[0]:.3f}", flush=True)
    """
)


def write_script(path: Path, body: str) -> Path:
    """Write an executable batch script whose text is ``body`` (dedented)."""
    path.write_text(textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def start_epoch(result_record: dict[str, str]) -> float:
    """The job's ``StartTime`` (local time, 1 s resolution) as a Unix timestamp."""
    return dt.datetime.fromisoformat(result_record["StartTime"]).timestamp()


@pytest.fixture(scope="module", autouse=True)
def usr1_jobs(
    slurm_cluster: SlurmCluster,  # noqa: F811  (the imported fixture, requested by name)
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """Submit the two SIGUSR1 jobs first (see module docstring); yield ``{"srun"|"mpirun": id}``."""
    work = tmp_path_factory.mktemp("usr1")
    (work / "usr1_rank.py").write_text(USR1_RANK)
    srun_job = write_script(
        work / "usr1_srun.sh",
        f"""\
        #!/bin/bash
        #SBATCH -n 2
        #SBATCH -o {work}/srun.out
        # No B: -> Slurm signals every srun-launched step, i.e. each rank directly.
        srun --mpi=pmix -n 2 {PYTHON} {work}/usr1_rank.py
        """,
    )
    mpirun_job = write_script(
        work / "usr1_mpirun.sh",
        f"""\
        #!/bin/bash
        #SBATCH -n 2
        #SBATCH -o {work}/mpirun.out
        # B: -> only this batch shell is signalled; forward it to mpirun, which passes
        # SIGUSR1 on to its ranks. mpirun runs in the background so the trap can fire.
        {MPI_ENV_LINES}
        mpirun -np 2 {PYTHON} {work}/usr1_rank.py &
        MPIRUN_PID=$!
        trap 'echo "batch SIGUSR1 $(date +%s.%N)"; kill -USR1 $MPIRUN_PID' USR1
        # wait returns (status > 128) when a trapped signal arrives: wait again until mpirun exits.
        while :; do
            wait $MPIRUN_PID; status=$?
            [ $status -le 128 ] && break
            kill -0 $MPIRUN_PID 2>/dev/null && continue
            wait $MPIRUN_PID; status=$?; break
        done
        exit $status
        """,
    )
    time_arg = f"--time={SIGNAL_TIME_LIMIT_S // 60}"
    jobs = {
        "srun": slurm_cluster.submit(srun_job, time_arg, f"--signal=USR1@{SIGNAL_LEAD_S}"),
        "mpirun": slurm_cluster.submit(mpirun_job, time_arg, f"--signal=B:USR1@{SIGNAL_LEAD_S}"),
    }
    jobs["workdir"] = str(work)
    yield jobs
    for name in ("srun", "mpirun"):
        slurm_cluster.cancel(jobs[name])


@pytest.mark.timeout(90)
def test_srun_pmix_launches_mpi4py_ranks(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """sbatch + srun --mpi=pmix gives a working 2-rank MPI world; 4 ranks fit on 2 cores."""
    script = write_script(
        tmp_path / "hello.sh",
        f"""\
        #!/bin/bash
        #SBATCH -n 4
        #SBATCH -o {tmp_path}/hello.out
        {MPI_ENV_LINES}
        srun --mpi=pmix -n 2 {PYTHON} -c "{MPI_HELLO}"
        echo "four ranks:"
        srun --mpi=pmix -n 4 {PYTHON} -c "{MPI_HELLO}"
        """,
    )
    job_id = slurm_cluster.submit(script)
    result = slurm_cluster.wait_for(job_id, timeout=60)
    out = (tmp_path / "hello.out").read_text()
    assert result.ok, f"{result.state} exit={result.exit_code}\n{out}"
    two, _, four = out.partition("four ranks:")
    assert sorted(re.findall(r"rank \d+/\d+ sum=\d+", two)) == [
        "rank 0/2 sum=1",
        "rank 1/2 sum=1",
    ], out
    assert sorted(re.findall(r"rank \d+/\d+ sum=\d+", four)) == [
        f"rank {r}/4 sum=6" for r in range(4)
    ], out


@pytest.mark.timeout(90)
def test_qsub_pbs_script_runs_mpirun_on_nodefile(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A PBS script submitted with qsub: #PBS resources honoured, PBS_* set, mpirun works."""
    script = write_script(
        tmp_path / "pbs_hello.pbs",
        f"""\
        #!/bin/bash
        #PBS -N pbs_hello
        #PBS -l select=1:ncpus=2:mpiprocs=2
        #PBS -l walltime=00:01:00
        echo "PBS_JOBID=$PBS_JOBID"
        echo "PBS_O_WORKDIR=$PBS_O_WORKDIR"
        # Slurm's PBS emulation leaves PBS_NODEFILE unset; generate_pbs_nodefile writes one.
        export PBS_NODEFILE=$(generate_pbs_nodefile)
        echo "PBS_NODEFILE=$PBS_NODEFILE"
        sed 's/^/node: /' "$PBS_NODEFILE"
        cd "$PBS_O_WORKDIR"
        {MPI_ENV_LINES}
        mpirun -hostfile "$PBS_NODEFILE" -np 2 {PYTHON} -c "{MPI_HELLO}"
        """,
    )
    # Slurm's qsub wrapper always passes its own -o/-e (<script>.o<id>) to sbatch, overriding
    # #PBS -o/-e/-j in the script, so output paths go on the qsub command line.
    job_id = slurm_cluster.qsub(
        script, "-j", "oe", "-o", str(tmp_path / "pbs_hello.out"), cwd=tmp_path
    )
    result = slurm_cluster.wait_for(job_id, timeout=60)
    out = (tmp_path / "pbs_hello.out").read_text()
    assert result.ok, f"{result.state} exit={result.exit_code}\n{out}"
    assert f"PBS_JOBID={job_id}\n" in out
    assert f"PBS_O_WORKDIR={tmp_path}\n" in out
    assert re.search(r"^PBS_NODEFILE=/\S+$", out, re.M), out
    assert re.findall(r"^node: (\S+)$", out, re.M) == [socket.gethostname().split(".")[0]] * 2, out
    assert sorted(re.findall(r"rank \d+/\d+ sum=\d+", out)) == [
        "rank 0/2 sum=1",
        "rank 1/2 sum=1",
    ], out
    # The #PBS lines became Slurm resources: 2 tasks, 1 minute.
    assert result.record["NumTasks"] == "2" and result.record["TimeLimit"] == "00:01:00", (
        result.record
    )


@pytest.mark.timeout(60)
def test_requeued_job_runs_again_with_restart_count(
    slurm_cluster: SlurmCluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    """`scontrol requeue` from inside a job: the second run sees SLURM_RESTART_COUNT=1, soon."""
    script = write_script(
        tmp_path / "requeue.sh",
        f"""\
        #!/bin/bash
        #SBATCH -n 1
        #SBATCH --requeue
        #SBATCH --open-mode=append
        #SBATCH -o {tmp_path}/requeue.out
        echo "run restart_count=${{SLURM_RESTART_COUNT:-unset}} start=$(date +%s.%N)"
        if [ "${{SLURM_RESTART_COUNT:-0}}" -eq 0 ]; then
            echo "requeue at $(date +%s.%N)"
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60
            echo "first run was not stopped by the requeue"
            exit 1
        fi
        """,
    )
    job_id = slurm_cluster.submit(script)
    result = slurm_cluster.wait_for(job_id, timeout=45)
    out = (tmp_path / "requeue.out").read_text()
    assert result.ok, f"{result.state} exit={result.exit_code}\n{out}"
    assert result.restarts == 1, result.record
    assert "run restart_count=unset" in out and "run restart_count=1 " in out, out
    assert "not stopped" not in out, out
    requeued_at = float(re.search(r"requeue at (\S+)", out).group(1))
    rerun_at = float(re.search(r"restart_count=1 start=(\S+)", out).group(1))
    delay = rerun_at - requeued_at
    logger.info("requeue delay (requeue call -> second run starts): %.1f s", delay)
    print(f"requeue delay: {delay:.1f} s")
    # Slurm's default would be ~121 s (cred_expire=120 + 1); slurm_local.sh sets cred_expire=5.
    assert 0 < delay < 30, out
    states = [rec.get("JobState") for rec in slurm_cluster.completion_records(job_id)]
    assert states[-1] == "COMPLETED" and len(states) == 2, states


@pytest.mark.timeout(SIGNAL_WAIT_TIMEOUT_S + 30)
@pytest.mark.parametrize("launcher", ["srun", "mpirun"])
def test_usr1_warning_reaches_every_rank(
    slurm_cluster: SlurmCluster,  # noqa: F811
    usr1_jobs: dict[str, str],
    launcher: str,
) -> None:
    """--signal=USR1@20 (srun ranks) / --signal=B:USR1@20 + trap (mpirun ranks) reach all ranks."""
    job_id = usr1_jobs[launcher]
    result = slurm_cluster.wait_for(job_id, timeout=SIGNAL_WAIT_TIMEOUT_S)
    out = (Path(usr1_jobs["workdir"]) / f"{launcher}.out").read_text()
    # COMPLETED (not TIMEOUT): the ranks saw the signal and left before the time limit.
    assert result.ok, f"{result.state} exit={result.exit_code}\n{out}"
    # The time has exactly three decimals (the rank's f-string): mpirun's output forwarding
    # can run two ranks' lines together ("…091.906rank 1/2 …", seen under load), and a \S+
    # would swallow the next line's "rank".
    got = {int(r): float(t) for r, t in re.findall(r"rank (\d+)/2 SIGUSR1 (\d+\.\d{3})", out)}
    assert sorted(got) == [0, 1], out
    end = start_epoch(result.record) + SIGNAL_TIME_LIMIT_S
    leads = [end - t for t in got.values()]
    logger.info(
        "%s: SIGUSR1 %.1f s before the time limit (asked: %d s)",
        launcher,
        min(leads),
        SIGNAL_LEAD_S,
    )
    print(
        f"{launcher}: SIGUSR1 arrived {min(leads):.1f}-{max(leads):.1f} s before the limit"
        f" (asked {SIGNAL_LEAD_S})"
    )
    # Never later than asked (1 s: StartTime resolution), at most one 30 s tick (+slack) early.
    assert all(SIGNAL_LEAD_S - 1.5 <= lead <= SIGNAL_LEAD_S + 35 for lead in leads), (leads, out)
