"""``mlbfgs-train --pde``: PINN runs as processes, on one process and under ``mpirun``.

What a PINN user relies on: the relative L2 error is logged; p ranks with the line-searched
MLBFGS end where one process ends (the loss and gradients averaged over ranks, every decision
of the search on the averaged values, no hang); Adam → L-BFGS in one run resumes across the
switch bit for bit; the mini-batch flag draws the same subsets whatever the number of ranks;
the baselines run under the same command.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mlbfgs_hpc.checkpoint import find_latest_valid, model_state_dict
from tests.train_runs import assert_same_final_state, read_metrics, run_training

#: A small Poisson problem: 400 interior + 80 boundary points (even: 2 ranks, equal shards).
SMALL = ["--pde", "poisson", "--collocation", "400", "--boundary-points", "80",
         "--width", "16", "--depth", "2", "--quiet", "--log-every", "1"]


def train(tmp_path: Path, name: str, *extra: str, ranks: int = 0, timeout: float = 300,
          expect: int = 0) -> list[dict]:
    run = tmp_path / name
    threads = [] if ranks else ["--threads", "1"]
    code, out = run_training([*SMALL, *threads, "--run-dir", str(run), *extra],
                             log=tmp_path / f"{name}.log", ranks=ranks, timeout=timeout)
    assert code == expect, out[-3000:]
    return read_metrics(run)


def final_params(run: Path) -> dict[str, torch.Tensor]:
    path = find_latest_valid(run)
    assert path is not None
    return model_state_dict(path)


@pytest.mark.timeout(600)
def test_two_ranks_with_the_line_search_end_where_one_process_ends(tmp_path: Path) -> None:
    args = ["--optimizer", "mlbfgs", "--line-search", "strong_wolfe", "--max-iter", "1",
            "--steps", "15"]
    one = train(tmp_path, "one", *args)
    two = train(tmp_path, "two", *args, ranks=2)
    evals = [[r["func_evals"] for r in m if r["event"] == "train"] for m in (one, two)]
    assert evals[0] == evals[1] and evals[0][-1] > 15   # the same search, and it searched
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    # float32: the two runs differ by the order of additions (the average over ranks);
    # measured ≤ 1e-5 relative after 15 steps.
    for name in a:
        relative = (a[name] - b[name]).abs() / a[name].abs().clamp_min(1e-2)
        assert float(relative.max()) <= 1e-4, name
    rel = [r["rel_l2"] for r in one if r["event"] == "eval"]
    assert len(rel) == 15 and rel[-1] < 0.5 * rel[0]   # evaluated every step; it learned
    summary = one[-1]
    assert summary["event"] == "summary" and summary["rel_l2"] == pytest.approx(rel[-1])


@pytest.mark.timeout(600)
def test_float64_trains_the_float32_problem_and_two_ranks_agree_to_its_rounding(
        tmp_path: Path) -> None:
    # --dtype float64: the same points and the same initial network (the float32 one, cast
    # up), so the first loss is float32's to float32's rounding; 2 ranks then end where one
    # process ends to float64's rounding (the reductions' order is all that differs).
    args = ["--optimizer", "mlbfgs", "--line-search", "strong_wolfe", "--max-iter", "1",
            "--steps", "10"]
    single = train(tmp_path, "f32", *args)
    one = train(tmp_path, "one", *args, "--dtype", "float64")
    two = train(tmp_path, "two", *args, "--dtype", "float64", ranks=2)
    first = [next(r["loss"] for r in m if r["event"] == "train") for m in (single, one, two)]
    assert first[1] == pytest.approx(first[0], rel=1e-5)
    assert first[2] == pytest.approx(first[1], rel=1e-12)
    a, b = final_params(tmp_path / "one"), final_params(tmp_path / "two")
    for name in a:
        assert a[name].dtype == torch.float64, name
        relative = (a[name] - b[name]).abs() / a[name].abs().clamp_min(1e-2)
        assert float(relative.max()) <= 1e-9, name
    assert one[-1]["rel_l2"] < 0.5 * next(r["rel_l2"] for r in one if r["event"] == "eval")


@pytest.mark.timeout(900)
def test_adam_then_lbfgs_resumes_across_the_switch_bit_for_bit(tmp_path: Path) -> None:
    recipe = ["--optimizer", "adam", "--lr", "1e-3", "--switch-at", "6", "--switch-to",
              "mlbfgs", "--line-search", "strong_wolfe", "--max-iter", "3",
              "--checkpoint-every", "1"]
    straight = train(tmp_path, "straight", *recipe, "--steps", "10")
    # Stopped in the Adam phase, exactly at the switch, and in the L-BFGS phase.
    for steps in ("4", "6", "8", "10"):
        train(tmp_path, "pieces", *recipe, "--steps", steps)
    assert_same_final_state(tmp_path / "straight", tmp_path / "pieces")
    records = [r for r in straight if r["event"] == "train"]
    evals = [r["func_evals"] for r in records]
    assert evals[:6] == [1, 2, 3, 4, 5, 6]          # Adam: one closure per step
    assert all(b - a >= 2 for a, b in zip(evals[6:], evals[7:]))   # L-BFGS: iterations
    # A record's lr is the next step's (as after a scheduler's step): L-BFGS's from step 6.
    assert records[4]["lr"] == 1e-3 and records[5]["lr"] == 1.0


@pytest.mark.timeout(600)
def test_collocation_minibatches_are_the_same_on_one_and_two_ranks(tmp_path: Path) -> None:
    args = ["--optimizer", "adam", "--lr", "3e-3", "--collocation-batch", "100",
            "--steps", "12", "--eval-every", "4"]
    one = train(tmp_path, "one", *args)
    two = train(tmp_path, "two", *args, ranks=2)
    loss = [[r["loss"] for r in m if r["event"] == "train"] for m in (one, two)]
    assert loss[0] == pytest.approx(loss[1], rel=1e-4)
    # A fresh subset every step: 4 steps of 100 points per pass over the 400.
    epochs = [r["epoch"] for r in one if r["event"] == "train"]
    assert epochs[3] == 1.0 and epochs[-1] == 3.0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("optimizer", [
    ["--optimizer", "lbfgs", "--line-search", "strong_wolfe", "--steps", "3"],
    ["--optimizer", "adam", "--steps", "5", "--switch-at", "3", "--switch-to", "lbfgs",
     "--line-search", "strong_wolfe"],
])
def test_the_baselines_run_under_the_same_command(tmp_path: Path, optimizer: list[str]
                                                  ) -> None:
    metrics = train(tmp_path, "run", *optimizer)
    summary = metrics[-1]
    assert summary["event"] == "summary" and math.isfinite(summary["rel_l2"])
    assert summary["total_func_evals"] > int(optimizer[optimizer.index("--steps") + 1])


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "mlp"], "--model does not apply to --pde"),
    (["--collocation-batch", "1000"], "more than the 400 interior points"),
    (["--optimizer", "mlbfgs", "--line-search", "strong_wolfe", "--momentum", "0.9"],
     "--momentum must be 0 with --line-search"),
    (["--optimizer", "adam", "--tolerance-change", "0"],
     "--tolerance-change applies to L-BFGS"),
])
def test_pinn_usage_errors_are_one_line(tmp_path: Path, extra: list[str], message: str
                                        ) -> None:
    code, out = run_training([*SMALL, "--run-dir", str(tmp_path / "r"), *extra],
                             log=tmp_path / "log", timeout=120)
    assert code == 2 and message in out, out[-2000:]


@pytest.mark.timeout(120)
def test_dtype_needs_a_pinn(tmp_path: Path) -> None:
    code, out = run_training(["--dtype", "float64", "--steps", "1", "--run-dir",
                              str(tmp_path / "r")], log=tmp_path / "log", timeout=100)
    assert code == 2 and "--dtype needs --pde" in out, out[-2000:]


def test_the_lbfgs_tolerances_reach_both_optimizers_and_a_resume(tmp_path: Path) -> None:
    # torch's defaults (1e-7, 1e-9) are absolute: a PINN whose loss is 1e-5 stops on them.
    # The flags set torch's param groups and MLBFGS's search, and a resumed run's flags win.
    from mlbfgs_hpc.comm import LocalCommunicator
    from mlbfgs_hpc.train import build_parser, build_trainer

    def trainer(run: str, *extra: str):
        args = build_parser().parse_args([*SMALL, "--threads", "1", "--run-dir",
                                          str(tmp_path / run), *extra])
        return build_trainer(args=args, comm=LocalCommunicator())

    search = ["--line-search", "strong_wolfe"]
    lbfgs = trainer("lbfgs", "--optimizer", "lbfgs", *search, "--tolerance-grad", "0",
                    "--tolerance-change", "0")
    group = lbfgs.optimizer.param_groups[0]
    assert (group["tolerance_grad"], group["tolerance_change"]) == (0.0, 0.0)
    mine = trainer("mine", "--optimizer", "mlbfgs", *search, "--tolerance-change", "1e-12")
    assert mine.optimizer.line_search.tolerance_change == 1e-12
    assert mine.optimizer.line_search.tolerance_grad == 1e-7     # torch's default
    first = trainer("resumed", "--optimizer", "lbfgs", *search, "--steps", "2")
    assert first.run() == 0
    assert first.optimizer.param_groups[0]["tolerance_change"] == 1e-9
    again = trainer("resumed", "--optimizer", "lbfgs", *search, "--steps", "3",
                    "--tolerance-change", "0")
    assert again.run() == 0 and again.step == 3
    assert again.optimizer.param_groups[0]["tolerance_change"] == 0.0
