"""What ``mlbfgs-train`` tells a user about a run directory, checked on real training runs.

* ``mlbfgs-ckpt diff``: two runs with the same flags and seed agree (with ``--rng`` too:
  ``--seed`` seeds numpy and ``random`` as well as torch); 1 process and 2 ranks with the same
  global batch agree within ``--rtol 1e-4``.
* Resuming with another ``--steps`` says so (old and new value) and follows the documented
  rule: the run is extended and its LR schedule becomes that of a run started with the new
  length; a length already reached ends the run without training.
* One writer per run directory: a second run on a busy directory exits at once (exit 2, the
  holder named) and the first finishes untouched; the lock goes with a killed holder; a
  requeued instance of the same SLURM job waits for its predecessor.
* Bad flag values and missing data: one line from rank 0, exit 2, no traceback (also under
  ``mpirun``); ``--help`` shows each default once.
* A diverged run: one line naming the last good checkpoint, exit 3; an mL-BFGS setting
  changed on resume is reported once.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mlbfgs_hpc import MLBFGS, runconfig, train
from mlbfgs_hpc.checkpoint import CheckpointReader
from mlbfgs_hpc.rundir import LOCK_NAME, RunDirBusyError, RunDirLock
from mlbfgs_hpc.seeding import seed_everything
from tests.ckpt_helpers import TOOL
from tests.mpi_helpers import PYTHON, REPO
from tests.train_runs import (
    BASE_ARGS,
    TrainProcess,
    assert_same_final_state,
    read_metrics,
    run_training,
    train_command,
    train_env,
    wait_for_step,
)

ARGS = [*BASE_ARGS, "--threads", "1", "--update-freq", "4", "--log-every", "1"]
START_TIMEOUT = 90.0


def ckpt_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, str(TOOL), *args], capture_output=True, text=True,
                          timeout=180)


def trained(tmp_path: Path, name: str, *extra: str, ranks: int = 0) -> Path:
    run = tmp_path / name
    code, out = run_training([*ARGS, "--run-dir", str(run), *extra], log=tmp_path / f"{name}.log",
                             ranks=ranks)
    assert code == 0, out[-3000:]
    return run


def lrs(run: Path) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in read_metrics(run) if r["event"] == "train"}


# ---- diff on real runs ------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_identical_runs_diff_clean_also_with_rng(tmp_path: Path) -> None:
    a = trained(tmp_path, "a", "--steps", "12", "--seed", "5")
    b = trained(tmp_path, "b", "--steps", "12", "--seed", "5")
    proc = ckpt_tool("diff", str(a), str(b))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  extra/elapsed_seconds: " in proc.stdout  # wall-clock: shown, not counted
    assert proc.stdout.splitlines()[-1].startswith("identical (bitwise): ")
    proc = ckpt_tool("diff", "--rng", str(a), str(b))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rng 0" in proc.stdout.splitlines()[-1]  # the RNG group was compared
    # The saved numpy/python states are those --seed 5 gives (nothing else drew from them).
    with CheckpointReader(path=a) as reader:
        saved = reader.rng_state(0)
    assert np.array_equal(saved.numpy_state[1], np.random.RandomState(5).get_state()[1])
    assert saved.python_state == random.Random(5).getstate()
    other = trained(tmp_path, "c", "--steps", "12", "--seed", "6")
    proc = ckpt_tool("diff", "--rng", str(a), str(other))
    assert proc.returncode == 1 and "rng/0/numpy:" in proc.stdout, proc.stdout


@pytest.mark.timeout(400)
def test_one_process_and_two_ranks_agree_within_rtol(tmp_path: Path) -> None:
    """Same global batch on 1 and 2 ranks: float32 sums in another order, nothing more."""
    one = trained(tmp_path, "one", "--steps", "24")
    two = trained(tmp_path, "two", "--steps", "24", ranks=2)
    proc = ckpt_tool("diff", "--rtol", "1e-4", str(one), str(two))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "  world_size: 1 vs 2" in proc.stdout.splitlines()
    print(proc.stdout.splitlines()[-1])


# ---- --seed -------------------------------------------------------------------------------
def test_seed_everything_seeds_every_generator() -> None:
    seed_everything(1234)
    got = (torch.rand(3), np.random.rand(3), random.random())
    want = (torch.rand(3, generator=torch.Generator().manual_seed(1234)),
            np.random.RandomState(1234).rand(3), random.Random(1234).random())
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    assert got[2] == want[2]
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
        seed_everything(2**32)


def test_trainer_seeds_numpy_and_random_from_seed(tmp_path: Path) -> None:
    """After set-up, numpy's and Python's generators are where ``--seed`` put them."""
    np.random.seed(99)
    random.seed(99)
    args = train.build_parser().parse_args(
        [*BASE_ARGS, "--seed", "7", "--run-dir", str(tmp_path / "r"), "--threads", "1"])
    train.Trainer(args=args, comm=train.LocalCommunicator())
    assert np.random.rand() == np.random.RandomState(7).rand()
    assert random.random() == random.Random(7).random()


# ---- the default warm-up ------------------------------------------------------------------
def test_default_warmup_is_a_tenth_of_the_run() -> None:
    assert [train.default_warmup_steps(n) for n in (1, 4, 5, 15, 20, 25, 936)] == \
        [0, 0, 1, 2, 2, 3, 94]
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        train.default_warmup_steps(0)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
@pytest.mark.parametrize("flags, warmup", [((), 3), (("--warmup-steps", "0"), 0),
                                           (("--warmup-steps", "5"), 5)])
def test_trainer_resolves_the_warmup_and_ramps_the_lr(tmp_path: Path, flags: tuple[str, ...],
                                                      warmup: int) -> None:
    """Without ``--warmup-steps`` a 30-step run ramps the lr over 3 steps (the resolved number
    is what the run's configuration, and so its checkpoints, record); ``0`` turns it off."""
    args = train.build_parser().parse_args(
        [*BASE_ARGS, "--steps", "30", "--lr", "0.1", "--run-dir", str(tmp_path / "r"),
         "--threads", "1", *flags])
    trainer = train.Trainer(args=args, comm=train.LocalCommunicator())
    assert trainer._run_config()["warmup_steps"] == warmup
    lrs = []
    for _ in range(warmup + 2):
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
        trainer.scheduler.step()
    # torch's LinearLR: lr/N at the first step, rising linearly to lr at step N + 1.
    ramp = [0.1 * (1 + (warmup - 1) * k / warmup) / warmup for k in range(warmup)]
    assert lrs[:warmup] == pytest.approx(ramp)
    assert lrs[warmup] == pytest.approx(0.1)  # the peak, then the cosine
    assert lrs[warmup + 1] < 0.1


# ---- resume with another run length ------------------------------------------------------
@pytest.mark.timeout(400)
def test_resume_with_other_steps_extends_and_replans(tmp_path: Path) -> None:
    run = trained(tmp_path, "run", "--steps", "15")
    code, out = run_training([*ARGS, "--run-dir", str(run), "--steps", "30"],
                             log=tmp_path / "resume.log")
    assert code == 0, out[-3000:]
    assert "resuming with a changed setting: --steps: 15 -> 30 (the new value applies; the " \
           "LR schedule is re-planned" in out, out[-3000:]
    assert "LR schedule re-planned for a 30-step run: lr at step 15" in out
    steps = [r["step"] for r in read_metrics(run) if r["event"] == "train"]
    assert steps == list(range(1, 31)), steps
    # From step 16 on, the lr is that of a run started with --steps 30 (not the 15-step
    # cosine climbing back from 0).
    reference = lrs(trained(tmp_path, "ref30", "--steps", "30"))
    resumed = lrs(run)
    assert [resumed[s] for s in range(16, 31)] == [reference[s] for s in range(16, 31)]
    assert resumed[15] < 1e-12 < resumed[16]

    # A length already reached: said so (old -> new too), no training.
    code, out = run_training([*ARGS, "--run-dir", str(run), "--steps", "20"],
                             log=tmp_path / "shorter.log")
    assert code == 0, out[-3000:]
    assert "--steps: 30 -> 20" in out and "already reached its 20 steps" in out, out[-3000:]
    assert [r["step"] for r in read_metrics(run) if r["event"] == "train"][-1] == 30


@pytest.mark.timeout(300)
def test_resume_with_another_update_freq_is_reported_once(tmp_path: Path) -> None:
    """An mL-BFGS setting changed on resume gets the trainer's one line, not a second one
    from the checkpoint loader (which does report it when used as a library)."""
    run = trained(tmp_path, "run", "--steps", "6")
    code, out = run_training([*ARGS, "--run-dir", str(run), "--steps", "8",
                              "--update-freq", "5"], log=tmp_path / "resume.log")
    assert code == 0, out[-3000:]
    mentions = [line for line in out.splitlines() if "update" in line and "freq" in line]
    assert len(mentions) == 1, mentions
    assert "resuming with a changed setting: --update-freq: 4 -> 5" in mentions[0]


# ---- a diverged run -----------------------------------------------------------------------
@pytest.mark.timeout(300)
def test_diverged_run_exits_3_naming_the_last_good_checkpoint(tmp_path: Path) -> None:
    """At step 11 the lr jumps by 1e30 (a step schedule): the gradients are non-finite from
    step 12 on, the optimizer stops the run at the 20th in a row (step 31) and mlbfgs-train
    exits 3 with one line naming the checkpoint of step 9 (those of steps 12 to 30 hold the
    parameters that overflowed); no final checkpoint, a ``diverged`` metrics record."""
    run = tmp_path / "run"
    code, out = run_training([*ARGS, "--run-dir", str(run), "--steps", "60", "--schedule",
                              "step", "--step-size", "10", "--gamma", "1e30",
                              "--warmup-steps", "0", "--checkpoint-every", "3", "--keep",
                              "100"], log=tmp_path / "log")
    assert code == 3, out[-3000:]
    errors = [line for line in out.splitlines() if "error" in line]
    good = run / "checkpoints" / "step-000009"
    assert errors == [
        "mlbfgs-train: error: step 31: training diverged: the gradient was non-finite at 20 "
        "steps in a row (max_consecutive_skips=20; 11 steps taken before them); last: "
        "'net.1.weight', 'net.1.bias', 'net.3.weight', 'net.3.bias', 'net.5.weight' and 1 "
        f"more; last good checkpoint: {good} (step 9); resume from it with --resume {good}, "
        "e.g. with a smaller --lr"], errors
    assert "Traceback" not in out
    # Rate-limited: the 1st, 2nd, 4th, 8th and 16th skipped steps are logged, not all 20.
    assert out.count("step skipped") == 5
    record = read_metrics(run)[-1]
    assert record == {"event": "diverged", "step": 31, "reason": "non-finite gradients",
                      "parameters": [f"net.{i}.{k}" for i in (1, 3, 5)
                                     for k in ("weight", "bias")],
                      "last_good_checkpoint": str(good)}
    assert not (run / "checkpoints" / "step-000031").exists()


@pytest.mark.timeout(400)
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_today_peers_resume_bit_for_bit(optimizer: str, tmp_path: Path) -> None:
    """AdamW and Muon (+ AdamW for the rest) through ``mlbfgs-train``: a run resumed from its
    mid-run checkpoint ends bit for bit where an uninterrupted run does."""
    flags = ("--steps", "16", "--optimizer", optimizer)
    straight = trained(tmp_path, "straight", *flags)
    run = trained(tmp_path, "run", *flags, "--checkpoint-every", "8")
    shutil.rmtree(run / "checkpoints" / "step-000016")  # as if it stopped after step 8
    code, out = run_training([*ARGS, "--run-dir", str(run), *flags],
                             log=tmp_path / "resume.log")
    assert code == 0, out[-3000:]
    assert "resumed from" in out and "at step 8" in out, out[-3000:]
    proc = ckpt_tool("diff", str(straight), str(run))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("identical (bitwise): ")
    with CheckpointReader(path=straight) as reader:
        assert reader.manifest["optimizer"]["class"].endswith(
            "MuonWithAdamW" if optimizer == "muon" else "AdamW")


@pytest.mark.parametrize("new_momentum", [0.9, 0.5])
def test_resume_rule_sets_mlbfgs_momentum_on_the_loaded_groups(new_momentum: float) -> None:
    """mL-BFGS's momentum is a param-group setting: the loaded groups carry the checkpoint's,
    a changed ``--momentum`` replaces it, an unchanged one leaves it (a scheduler's value)."""
    def fresh() -> MLBFGS:
        return MLBFGS([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=new_momentum)

    saved_opt = MLBFGS([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9)
    saved_opt.param_groups[0]["momentum"] = 0.85   # as a momentum-cycling scheduler leaves it
    optimizer = fresh()
    optimizer.load_state_dict(saved_opt.state_dict())
    assert optimizer.param_groups[0]["momentum"] == 0.85
    changes = runconfig.apply_on_resume(
        {"momentum": 0.9}, {"momentum": new_momentum}, optimizer=optimizer, scheduler=None,
        step=0, total_steps=10, lr=0.1, build_scheduler=lambda o: None, report=False)
    assert [c.key for c in changes] == ([] if new_momentum == 0.9 else ["momentum"])
    assert optimizer.param_groups[0]["momentum"] == (0.85 if new_momentum == 0.9 else 0.5)


def test_resume_rule_new_settings_win_and_the_schedule_is_replanned() -> None:
    """runconfig.apply_on_resume on a loaded optimizer: changed param-group settings are set,
    the schedule is the new settings' one at the resumed step, unchanged settings stay."""
    def build(optimizer: torch.optim.Optimizer, total: int = 20) -> Any:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)

    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.0)
    scheduler = build(optimizer, total=10)  # the checkpoint's 10-step plan at lr 0.1 ...
    for _ in range(6):
        optimizer.step()
        scheduler.step()
    saved = {"steps": 10, "lr": 0.1, "weight_decay": 0.0, "momentum": 0.9, "keep": 3}
    current = {"steps": 20, "lr": 0.05, "weight_decay": 0.01, "momentum": 0.9, "keep": 3}
    changes = runconfig.apply_on_resume(saved, current, optimizer=optimizer,
                                        scheduler=scheduler, step=6, total_steps=20, lr=0.05,
                                        build_scheduler=build, report=False)
    assert sorted(c.key for c in changes) == ["lr", "steps", "weight_decay"]
    assert str(changes[0]).startswith("--steps: 10 -> 20 (the new value applies; the LR")
    group = optimizer.param_groups[0]
    assert group["weight_decay"] == 0.01 and group["momentum"] == 0.9
    reference_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.05)
    reference = build(reference_opt)  # ... becomes a 20-step plan at lr 0.05, at step 6
    for _ in range(6):
        reference_opt.step()
        reference.step()
    assert group["lr"] == reference_opt.param_groups[0]["lr"]
    for _ in range(5):  # and continues as that plan does
        optimizer.step()
        scheduler.step()
        reference_opt.step()
        reference.step()
    assert group["lr"] == reference_opt.param_groups[0]["lr"]


# ---- one writer per run directory ----------------------------------------------------------
@pytest.mark.timeout(400)
def test_second_run_on_busy_run_dir_exits_at_once(tmp_path: Path) -> None:
    args = [*ARGS, "--steps", "40", "--checkpoint-every", "10"]
    reference = trained(tmp_path, "reference", "--steps", "40", "--checkpoint-every", "10")
    run = tmp_path / "run"
    # 40 steps of >= 0.5 s: the second run (a python + torch start-up, several seconds on a
    # loaded machine) is refused while the first still trains.
    first = TrainProcess(args=[*args, "--run-dir", str(run), "--step-sleep", "0.5"],
                         log=tmp_path / "first.log")
    wait_for_step(first, run, 2, timeout=START_TIMEOUT)
    code, out = run_training([*args, "--run-dir", str(run)], log=tmp_path / "second.log")
    assert first.proc.poll() is None, "the first run ended before the second was refused"
    assert code == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("mlbfgs-train: error:")]
    assert len(errors) == 1 and "Traceback" not in out, out
    assert f"process {first.pid} on host {socket.gethostname()}" in errors[0], errors
    assert f"run directory {run} is in use" in errors[0]
    assert first.wait(timeout=300) == 0, first.output()[-3000:]
    steps = [r["step"] for r in read_metrics(run) if r["event"] == "train"]
    assert steps == list(range(1, 41)), steps  # no line of the second run
    assert_same_final_state(reference, run)  # checkpoints untouched by the second run


def _hold_lock_script(run: Path, seconds: float) -> list[str]:
    code = (f"import sys, time; from mlbfgs_hpc.rundir import RunDirLock; "
            f"RunDirLock(run_dir={str(run)!r}).acquire(); print('held', flush=True); "
            f"time.sleep({seconds})")
    return [PYTHON, "-c", code]


def _start_holder(run: Path, seconds: float, **env: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(_hold_lock_script(run, seconds), stdout=subprocess.PIPE,
                            text=True, env={**train_env(), **env}, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lock_is_dropped_when_the_holder_is_killed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _start_holder(run, 300)
    try:
        with pytest.raises(RunDirBusyError, match=f"process {holder.pid} on host "):
            RunDirLock(run_dir=run).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        lock = RunDirLock(run_dir=run).acquire()  # no stale lock left behind
        assert lock.held and (run / LOCK_NAME).read_text().split()[1] == str(os.getpid())
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


def test_requeued_same_slurm_job_waits_for_its_predecessor(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    run = tmp_path / "run"
    holder = _start_holder(run, 3, SLURM_JOB_ID="4242")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4243")  # another job: refused at once
        with pytest.raises(RunDirBusyError, match="SLURM job 4242"):
            RunDirLock(run_dir=run, same_job_wait_s=30).acquire()
        monkeypatch.setenv("SLURM_JOB_ID", "4242")  # its requeued instance: waits, then runs
        lock = RunDirLock(run_dir=run, same_job_wait_s=60).acquire()
        assert lock.held and holder.poll() is not None
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


@pytest.mark.timeout(300)
def test_busy_run_dir_under_mpirun_every_rank_stops_rank_0_reports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _start_holder(run, 300)
    try:
        code, out = run_training([*ARGS, "--steps", "5", "--run-dir", str(run)],
                                 log=tmp_path / "mpi.log", ranks=2)
        assert code == 2, out[-3000:]
        errors = [line for line in out.splitlines() if "mlbfgs-train: error:" in line]
        assert len(errors) == 1 and f"process {holder.pid} on host " in errors[0], out
        assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


# ---- bad flags, missing data, --help -------------------------------------------------------
@pytest.mark.parametrize(("flags", "named"), [
    (["--lr", "-1"], "--lr must be a finite number >= 0, got -1.0"),
    (["--history-size", "0"], "--history-size must be an integer >= 1, got 0"),
    (["--sigma-high", "0.5"], "--sigma-high must be a number > 1"),
    (["--momentum", "1"], "--momentum must be in [0, 1), got 1.0"),
    (["--max-grad-norm", "0"], "--max-grad-norm must be a finite number > 0, got 0.0"),
    (["--momentum", "0", "--nesterov"], "--nesterov must be False when momentum == 0"),
    (["--steps", "0"], "--steps must be an integer >= 1"),
    (["--data-root", "/nonexistent/fmnist"], "--data-root /nonexistent/fmnist: no such directory"),
    (["--model", "nope"], "argument --model: invalid choice: 'nope'"),
    (["--optimizer", "sgd", "--line-search", "strong_wolfe"],
     "--line-search strong_wolfe needs --optimizer lbfgs or mlbfgs"),
])
def test_bad_flag_value_is_one_line_and_exit_2(flags: list[str], named: str,
                                               tmp_path: Path) -> None:
    proc = subprocess.run(train_command([*ARGS, "--run-dir", str(tmp_path / "r"), *flags]),
                          capture_output=True, text=True, env=train_env(), cwd=REPO,
                          timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlbfgs-train: error: "), proc.stderr
    assert named in lines[0]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("flags", [["--lr", "-1"], ["--dataset", "fashion-mnist"]])
def test_under_mpirun_only_rank_0_reports(flags: list[str], tmp_path: Path) -> None:
    """Before MPI starts (a flag) and after (the data, here a directory without the files)."""
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(train_command([*ARGS, "--run-dir", str(tmp_path / "r"),
                                         "--data-root", str(empty), *flags], ranks=2),
                          capture_output=True, text=True, env=train_env(), cwd=REPO,
                          timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    errors = [line for line in out.splitlines() if "mlbfgs-train: error:" in line]
    assert len(errors) == 1 and "Traceback" not in out, out
    expected = "--lr must be" if "--lr" in flags else f"Fashion-MNIST file {empty}/"
    assert expected in errors[0], errors


@pytest.mark.parametrize("optimizer", ["mlbfgs", "sgd"])
def test_max_grad_norm_clips_and_logs_the_norm(optimizer: str, tmp_path: Path) -> None:
    """``--max-grad-norm``: every optimizer's train records carry the gradient's norm before
    the clip, and a tiny bound changes the run (it clipped); without it there is no norm."""
    finals = {}
    for bound in (None, "1e-3"):
        run = tmp_path / str(bound)
        flags = [] if bound is None else ["--max-grad-norm", bound]
        code, out = run_training([*ARGS, "--optimizer", optimizer, "--steps", "6",
                                  "--run-dir", str(run), *flags], log=tmp_path / "log")
        assert code == 0, out[-3000:]
        records = [r for r in read_metrics(run) if r["event"] == "train"]
        if bound is None:
            assert all("grad_norm" not in r for r in records)
        else:
            assert len(records) == 6 and all(1e-3 < r["grad_norm"] < 1e3 for r in records)
        finals[bound] = records[-1]["loss"]
    assert finals[None] != finals["1e-3"]


@pytest.mark.timeout(400)
def test_horovodrun_trains_as_mpirun_does(tmp_path: Path) -> None:
    """``horovodrun -np 2 -H localhost:2`` (Horovod's launcher, on MPI) ends in the bitwise
    state of ``mpirun -np 2`` with the same arguments (pairs formed: T = 4, 12 steps)."""
    args = [*ARGS, "--steps", "12"]
    code, out = run_training([*args, "--run-dir", str(tmp_path / "mpirun")],
                             log=tmp_path / "mpirun.log", ranks=2, timeout=180)
    assert code == 0, out[-3000:]
    horovodrun = str(Path(PYTHON).parent / "horovodrun")
    proc = subprocess.run([horovodrun, "-np", "2", "-H", "localhost:2",
                           *train_command([*args, "--run-dir", str(tmp_path / "hvd")])],
                          capture_output=True, text=True, env=train_env(), cwd=REPO,
                          timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics = read_metrics(tmp_path / "hvd")
    assert metrics[-1]["world_size"] == 2 and metrics[-1]["accepted_pairs"] > 0, metrics[-1]
    assert_same_final_state(tmp_path / "mpirun", tmp_path / "hvd")


def test_processes_started_without_mpi_are_refused(tmp_path: Path) -> None:
    """``horovodrun`` on Gloo exports HOROVOD_RANK/HOROVOD_SIZE and no MPI variable (Horovod's
    ``gloo_run``): every process would train alone. Both exit 2, rank 0 alone says why, and
    nothing is trained. (This Horovod has no Gloo, so the two processes are started here
    with the environment ``gloo_run`` gives them.)"""
    procs = [subprocess.Popen(train_command([*ARGS, "--run-dir", str(tmp_path / "r")]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=train_env(HOROVOD_RANK=str(rank), HOROVOD_SIZE="2"),
                              cwd=REPO)
             for rank in (0, 1)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [2, 2], outputs
    (out0, err0), (out1, err1) = outputs
    assert err0.startswith("mlbfgs-train: error: started by horovodrun with Gloo (2 processes")
    assert "horovodrun --mpi" in err0 and len(err0.splitlines()) == 1, err0
    assert out1 + err1 == "", err1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
    # MLBFGS_COMM=local says "one process on purpose": it trains.
    proc = subprocess.run(train_command([*ARGS, "--steps", "2", "--run-dir", str(tmp_path / "l")]),
                          capture_output=True, text=True, cwd=REPO, timeout=120,
                          env=train_env(HOROVOD_RANK="0", HOROVOD_SIZE="2", MLBFGS_COMM="local"))
    assert proc.returncode == 0, proc.stderr


def test_internal_errors_keep_their_traceback(tmp_path: Path) -> None:
    """A genuine bug (here: the training loop raising) is not a usage error: traceback."""
    code = ("import sys\n"
            "from mlbfgs_hpc import train\n"
            "def broken(self, **kwargs):\n"
            "    raise RuntimeError('an internal error')\n"
            "train.Trainer.run = broken\n"
            f"sys.exit(train.main({[*ARGS, '--run-dir', str(tmp_path / 'r')]!r}))\n")
    proc = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True,
                          env=train_env(), cwd=REPO, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: an internal error" in proc.stderr
    assert "mlbfgs-train: error:" not in proc.stderr


def test_help_shows_each_default_once() -> None:
    text = " ".join(subprocess.run([PYTHON, "-m", "mlbfgs_hpc", "--help"], capture_output=True,
                                   text=True, env=train_env(), cwd=REPO, timeout=60,
                                   check=True).stdout.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert not re.search(r"\(default[^()]*(\([^()]*\))?[^()]*\)\s*\(default", text), text
    assert "--batch-size BATCH_SIZE GLOBAL batch size, over all ranks (default: 128)" in text
    assert "(default: a third of the run)" in text and "(default: 0.1)" in text
