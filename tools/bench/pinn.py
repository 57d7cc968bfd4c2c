"""PINN benchmarks: every optimizer of a grid on a task, seeds side by side, read back.

Every run is the real command, ``mlbfgs-train --pde TASK`` (one thread per process; under
``mpirun -np 2`` for a 2-rank run), evaluated every step (the relative L2 error against the
task's reference; evaluation time is excluded from the logged training time), stopped by
``--stop-after`` once its wall-clock budget is spent. Runs go two at a time, in the order
of the plan, so the two settings a ratio compares run side by side on the two cores. A run
that finished is read back, not redone: a sweep can be stopped and restarted.

::

    python tools/bench/pinn.py run --out bench-results/pinn --plan grid --task poisson
    python tools/bench/pinn.py report --out bench-results/pinn --task poisson --budget 60
    python tools/bench/pinn.py plot --out bench-results/pinn --task poisson \\
        --png tools/benchmarks/pinn_poisson.png

What a report gives per setting (median over seeds, [min – max]): training seconds and
closure evaluations to a relative L2 error of 1e-2, 1e-3 and 1e-4 (``–``: not reached within
the budget by the median seed), and the error reached after ``--budget`` training seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import concurrent.futures
import json
import logging
import math
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import markdown_table, mpi_env  # noqa: E402

logger = logging.getLogger("pinn-bench")
REPO = Path(__file__).resolve().parents[2]
TARGETS: tuple[float, ...] = (1e-2, 1e-3, 1e-4)
#: Training-time budget per task (seconds); the wall-clock limit adds start-up and evaluation.
#: helmholtz was 480 s until the amendment of 2026-12-08 00:05 UTC (before any helmholtz
#: run): CPU time left for the session.
BUDGETS: dict[str, float] = {"poisson": 60.0, "burgers": 240.0, "convection": 60.0,
                             "helmholtz": 240.0}

LBFGS = ["--line-search", "strong_wolfe"]


def grid_settings() -> dict[str, list[str]]:
    """The grid of BENCHMARKS' PINN protocol (fixed before the runs), setting -> flags."""
    settings: dict[str, list[str]] = {
        "lbfgs": ["--optimizer", "lbfgs", *LBFGS, "--history-size", "100"],
        "mlbfgs": ["--optimizer", "mlbfgs", *LBFGS, "--history-size", "100"]}
    for lr in ("1e-3", "3e-3", "1e-2"):
        # Evaluated every 10 steps (an Adam step is one closure: evaluating at each would
        # cost 10-15 % of the wall-clock, though not of the logged training time).
        settings[f"adam_{lr}"] = ["--optimizer", "adam", "--lr", lr, "--eval-every", "10"]
    # Not in the default grid (--setting): DeepXDE's L-BFGS tolerances (ftol 0, gtol 1e-8)
    # instead of torch's absolute 1e-9 / 1e-7, which stop a PINN near a loss of 1e-5.
    for name in ("lbfgs", "mlbfgs"):
        settings[f"{name}_dx"] = [*settings[name], "--tolerance-grad", "1e-8",
                                  "--tolerance-change", "0"]
    # Not in the default grid (--setting): does more than one iteration per step() pay?
    settings["mlbfgs_it1"] = ["--optimizer", "mlbfgs", *LBFGS, "--history-size", "100",
                              "--max-iter", "1"]
    for switch in (500, 2000):
        for target in ("lbfgs", "mlbfgs"):
            settings[f"adam{switch}_{target}"] = [
                "--optimizer", "adam", "--lr", "1e-3", "--switch-at", str(switch),
                "--switch-to", target, *LBFGS, "--history-size", "100"]
    return settings


#: The resampled-collocation study: pools and mini-batch per task (interior, boundary).
RESAMPLED_POOLS: dict[str, tuple[int, int]] = {"poisson": (20000, 2000),
                                               "burgers": (20000, 600),
                                               "helmholtz": (20000, 4000)}
RESAMPLED_BATCH = 1000
#: The scaling runs: interior points and training-time budget (seconds).
SCALING_POINTS = 200_000
SCALING_BUDGET = 480.0   # 800 s until the amendment of 2026-12-08 00:05 UTC
#: A research hook outside the package (a scratch worktree), for variants not in main.
RESEARCH_TREE = Path("/work/wt-research")


def resampled_settings(task: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    """The resampled study's variants (fixed before its runs): setting -> (flags, env)."""
    pool, boundary = RESAMPLED_POOLS[task]
    common = ["--collocation", str(pool), "--boundary-points", str(boundary),
              "--collocation-batch", str(RESAMPLED_BATCH), "--max-iter", "1",
              "--eval-every", "5"]
    searched = ["--optimizer", "mlbfgs", *LBFGS]
    return {
        "V0_torch_lbfgs": (["--optimizer", "lbfgs", *LBFGS, *common], {}),
        "V1_beta0": ([*searched, *common], {}),
        "V2_beta09": ([*searched, "--beta-param", "0.9", "--beta-grad", "0.9", *common], {}),
        "V3_beta05": ([*searched, "--beta-param", "0.5", "--beta-grad", "0.5", *common], {}),
        "V4_beta09_T5": ([*searched, "--beta-param", "0.9", "--beta-grad", "0.9",
                          "--update-freq", "5", *common], {}),
        "V5_adam_1e-3": (["--optimizer", "adam", "--lr", "1e-3", *common], {}),
        "V5_adam_3e-3": (["--optimizer", "adam", "--lr", "3e-3", *common], {}),
        "V6_same_batch": ([*searched, *common],
                          {"MLBFGS_RESEARCH_SAME_BATCH_PAIRS": "1",
                           "PYTHONPATH": str(RESEARCH_TREE)}),
    }


@dataclass(frozen=True)
class RunSpec:
    """One run: its setting's name, the task, the seed, ranks (0: plain process), flags,
    the training-time budget and extra environment (a research hook's)."""

    setting: str
    task: str
    seed: int
    ranks: int
    flags: tuple[str, ...]
    budget: float
    env: tuple[tuple[str, str], ...] = ()
    alone: bool = False   # run with nothing beside it (a timing against a 2-rank run)

    @property
    def name(self) -> str:
        return f"{self.task}/{self.setting}_s{self.seed}"

    def command(self, run_dir: Path) -> list[str]:
        wall = 1.2 * self.budget + 15.0   # + start-up and evaluations (not training time)
        cmd = [sys.executable, "-m", "mlbfgs_hpc", "--pde", self.task, "--seed",
               str(self.seed), "--run-dir", str(run_dir), "--resume", "never", "--quiet",
               "--threads", "1", "--steps", "1000000", "--stop-after", f"{wall:.0f}",
               "--eval-every", "1", *self.flags]   # (a later --eval-every wins)
        if self.ranks:
            cmd = [shutil.which("mpirun") or "mpirun", "-np", str(self.ranks), "--bind-to",
                   "none", *cmd]
        return cmd


def plan(name: str, *, tasks: list[str], seeds: list[int], settings: list[str] | None,
         budget: float | None = None, dtype: str = "float32") -> list[RunSpec]:
    """The runs of a plan, in the order they run (two at a time: neighbours side by side).

    ``grid``: every setting of :func:`grid_settings`, torch's L-BFGS beside MLBFGS at the
    same history, Adam beside Adam, each Adam -> torch L-BFGS beside Adam -> MLBFGS.
    ``ranks``: MLBFGS (history 100) on 2 ranks, and torch L-BFGS with 2 threads, beside
    nothing (each uses both cores).

    ``budget`` replaces the tasks' training-time budgets; ``dtype`` float64 adds
    ``--dtype float64`` to every run.
    """
    specs: list[RunSpec] = []
    grid = grid_settings()
    for task in tasks:
        task_budget = budget or BUDGETS[task]
        if name == "grid":
            chosen = settings or [s for s in grid
                                  if s not in ("mlbfgs_it1", "lbfgs_dx", "mlbfgs_dx")]
            for seed in seeds:
                specs += [RunSpec(s, task, seed, 0, tuple(grid[s]), task_budget)
                          for s in chosen]
        elif name == "resampled":
            variants = resampled_settings(task)
            chosen = settings or list(variants)
            for seed in seeds:
                specs += [RunSpec(v, task, seed, 0, tuple(variants[v][0]), task_budget,
                                  tuple(variants[v][1].items())) for v in chosen]
        elif name == "ranks":
            for seed in seeds:
                specs += [RunSpec("mlbfgs_2ranks", task, seed, 2, tuple(grid["mlbfgs"]),
                                  task_budget),
                          RunSpec("lbfgs_2threads", task, seed, 0,
                                  (*grid["lbfgs"], "--threads", "2"), task_budget, alone=True)]
        elif name == "scaling":
            # 2·10⁵ interior points: one process, then 2 ranks, each alone on the machine.
            big = ("--collocation", str(SCALING_POINTS))
            for seed in seeds:
                specs += [RunSpec(f"mlbfgs_{SCALING_POINTS}", task, seed, 0,
                                  (*grid["mlbfgs"], *big), SCALING_BUDGET, alone=True),
                          RunSpec(f"mlbfgs_{SCALING_POINTS}_2ranks", task, seed, 2,
                                  (*grid["mlbfgs"], *big), SCALING_BUDGET)]
        else:
            raise ValueError(f"unknown plan {name!r}")
    if dtype != "float32":
        specs = [dataclasses.replace(spec, flags=(*spec.flags, "--dtype", dtype))
                 for spec in specs]
    return specs


def run_dir_of(out: Path, spec: RunSpec) -> Path:
    return out / "runs" / spec.name


def _run(spec: RunSpec, out: Path) -> str:
    run_dir = run_dir_of(out, spec)
    done = run_dir / "done.json"
    if done.is_file():
        return f"{spec.name}: done before"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    start = time.monotonic()
    with (run_dir / "log.txt").open("w") as log:
        env = dict(spec.env)
        cwd = Path(env.get("PYTHONPATH", REPO))
        proc = subprocess.run(spec.command(run_dir), stdout=log, stderr=subprocess.STDOUT,
                              env=mpi_env(OMP_NUM_THREADS="1", **env), cwd=cwd,
                              timeout=3 * spec.budget + 300)
    wall = time.monotonic() - start
    (run_dir / "spec.json").write_text(json.dumps({**spec.__dict__, "flags": spec.flags}))
    (run_dir / "done.json").write_text(json.dumps({"exit": proc.returncode, "wall": wall}))
    return f"{spec.name}: exit {proc.returncode} in {wall:.0f} s"


def _extend(spec: RunSpec, out: Path, extra: float) -> str:
    """Resume a finished run from its last checkpoint for ``extra`` more training seconds
    (its metrics.jsonl continues; the logged time counts on from the checkpoint's)."""
    run_dir = run_dir_of(out, spec)
    done_path = run_dir / "done.json"
    if not done_path.is_file():
        return f"{spec.name}: not run, nothing to extend"
    done = json.loads(done_path.read_text())
    target = spec.budget + extra
    if done.get("budget", spec.budget) >= target:
        return f"{spec.name}: extended before"
    command = spec.command(run_dir)
    command[command.index("never")] = "auto"
    command[command.index("--stop-after") + 1] = f"{1.2 * extra + 15.0:.0f}"
    start = time.monotonic()
    with (run_dir / "log.txt").open("a") as log:
        env = dict(spec.env)
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                              env=mpi_env(OMP_NUM_THREADS="1", **env),
                              cwd=Path(env.get("PYTHONPATH", REPO)),
                              timeout=3 * extra + 300)
    wall = time.monotonic() - start
    done_path.write_text(json.dumps({**done, "budget": target, "extended_exit": proc.returncode,
                                     "extended_wall": wall}))
    return f"{spec.name}: extended to {target:g} s, exit {proc.returncode} in {wall:.0f} s"


def run_all(specs: list[RunSpec], out: Path, *, jobs: int, extra: float = 0.0) -> None:
    """Run ``specs`` ``jobs`` at a time (a 2-rank run alone: it uses every core); with
    ``extra``, extend finished runs by that many training seconds instead."""
    pending = list(specs)
    while pending:
        batch = [pending.pop(0)]
        while (pending and len(batch) < jobs and batch[0].ranks == 0 and not batch[0].alone
               and pending[0].ranks == 0 and not pending[0].alone):
            batch.append(pending.pop(0))
        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            for line in pool.map(lambda s: _extend(s, out, extra) if extra else _run(s, out),
                                 batch):
                logger.info("%s", line)


# ---- reading back --------------------------------------------------------------------------
def evals_of(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "eval"]


def reaching(evals: list[dict[str, Any]], target: float, budget: float
             ) -> tuple[float, float] | None:
    """(training seconds, closure evaluations) of the first evaluation with rel_l2 ≤ target
    within the budget, or ``None``."""
    for record in evals:
        if record["time"] > budget:
            return None
        if record["rel_l2"] <= target:
            return record["time"], float(record["func_evals"])
    return None


def error_at(evals: list[dict[str, Any]], budget: float) -> float:
    """The last relative L2 error logged within ``budget`` training seconds (NaN: none; a
    diverged run's last finite value is kept: its later evaluations are NaN)."""
    within = [r["rel_l2"] for r in evals if r["time"] <= budget]
    finite = [e for e in within if math.isfinite(e)]
    if not within:
        return math.nan
    return within[-1] if math.isfinite(within[-1]) else (finite[-1] if finite else math.nan)


def _median_cell(values: list[float | None], digits: int = 3) -> str:
    """Median over seeds with [min – max]; a seed that never reached counts as +inf."""
    numbers = [math.inf if v is None else v for v in values]
    med = statistics.median(numbers)
    if not math.isfinite(med):
        reached = sum(v is not None for v in values)
        return f"– ({reached}/{len(values)})"
    lo, hi = min(numbers), max(numbers)
    fmt = f"{{:.{digits}g}}"
    hi_text = "∞" if not math.isfinite(hi) else fmt.format(hi)
    return f"{fmt.format(med)} [{fmt.format(lo)}–{hi_text}]"


def report(out: Path, task: str, budget: float) -> str:
    """A markdown table of every setting of ``task`` found under ``out``."""
    rows = []
    by_setting: dict[str, list[list[dict[str, Any]]]] = {}
    for run_dir in sorted((out / "runs" / task).glob("*_s*")):
        if not (run_dir / "done.json").is_file():
            continue
        setting = run_dir.name.rsplit("_s", 1)[0]
        by_setting.setdefault(setting, []).append(evals_of(run_dir))
    for setting, runs in by_setting.items():
        row: list[Any] = [setting, len(runs)]
        for target in TARGETS:
            hits = [reaching(e, target, budget) for e in runs]
            row.append(_median_cell([h[0] if h else None for h in hits]))
            row.append(_median_cell([h[1] if h else None for h in hits], digits=4))
        row.append(_median_cell([error_at(e, budget) for e in runs]))
        rows.append(row)
    header = ["setting", "seeds"]
    for target in TARGETS:
        header += [f"s to {target:g}", f"evals to {target:g}"]
    header.append(f"rel L2 at {budget:g} s")
    table = markdown_table(header, rows)
    ratios = paired_ratios(out, task, budget)   # (closure evaluations: load-independent)
    return table if not ratios else f"{table}\n\n{ratios}"


#: Pairs run side by side (numerator, denominator): criterion 1 and the switch's twin.
PAIRS: tuple[tuple[str, str], ...] = (("mlbfgs", "lbfgs"), ("adam500_mlbfgs", "adam500_lbfgs"),
                                      ("adam2000_mlbfgs", "adam2000_lbfgs"),
                                      ("mlbfgs_dx", "lbfgs_dx"), ("mlbfgs_it1", "mlbfgs"))


def paired_ratios(out: Path, task: str, budget: float) -> str:
    """Time-to-target ratios of the pairs of :data:`PAIRS`, per seed (the two runs of a seed
    ran side by side), for the targets the denominator reached; '–' where the numerator
    did not reach a target the denominator did."""
    rows = []
    for mine, theirs in PAIRS:
        per_seed: dict[float, list[str]] = {t: [] for t in TARGETS}
        for run in sorted((out / "runs" / task).glob(f"{theirs}_s*")):
            other = run.with_name(run.name.replace(theirs, mine, 1))
            if not ((run / "done.json").is_file() and (other / "done.json").is_file()):
                continue
            for target in TARGETS:
                base = reaching(evals_of(run), target, budget)
                if base is None:
                    continue
                hit = reaching(evals_of(other), target, budget)
                per_seed[target].append(f"{hit[0] / base[0]:.2f} ({hit[1] / base[1]:.2f})"
                                        if hit else "–")
        for target, cells in per_seed.items():
            if cells:
                rows.append([f"{mine} / {theirs}", f"{target:g}", len(cells), " / ".join(cells)])
    if not rows:
        return ""
    return markdown_table(["pair (side by side)", "target", "seeds reached by the second",
                           "time ratio per seed (evaluations ratio)"], rows)


def plot(out: Path, task: str, png: Path, settings: list[str] | None, budget: float) -> None:
    """Relative L2 error against training seconds, every seed, one colour per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = settings or sorted({d.name.rsplit("_s", 1)[0]
                                for d in (out / "runs" / task).glob("*_s*")})
    for i, setting in enumerate(names):
        for j, run_dir in enumerate(sorted((out / "runs" / task).glob(f"{setting}_s*"))):
            evals = [r for r in evals_of(run_dir) if r["time"] <= budget]
            ax.plot([r["time"] for r in evals], [r["rel_l2"] for r in evals],
                    color=colours[i % len(colours)], linewidth=1.0, alpha=0.85,
                    label=setting if j == 0 else None)
    for target in TARGETS:
        ax.axhline(target, color="grey", linewidth=0.6, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("training seconds (one core per process)")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{task}: every seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=("run", "extend", "report", "plot"))
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--task", action="append", required=True, choices=sorted(BUDGETS))
    p.add_argument("--plan", default="grid",
                   choices=("grid", "ranks", "resampled", "scaling"))
    p.add_argument("--setting", action="append", default=None,
                   help="only these settings of the grid (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--budget", type=float, default=None,
                   help="training seconds of the runs and of the report (default: the "
                        "task's budget)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="run: the PINN's precision (--dtype of mlbfgs-train)")
    p.add_argument("--png", type=Path, default=None)
    p.add_argument("--extra", type=float, default=0.0,
                   help="extend: training seconds to add to each finished run (resumed from "
                        "its last checkpoint, side by side as the plan pairs them)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.action in ("run", "extend"):
        if args.action == "extend" and args.extra <= 0:
            p.error("extend needs --extra SECONDS > 0")
        run_all(plan(args.plan, tasks=args.task, seeds=args.seeds, settings=args.setting,
                     budget=args.budget, dtype=args.dtype),
                args.out, jobs=args.jobs, extra=args.extra)
        return 0
    for task in args.task:
        budget = args.budget or BUDGETS[task]
        if args.action == "report":
            print(f"### {task} (budget {budget:g} s)\n\n{report(args.out, task, budget)}\n")
        else:
            plot(args.out, task, args.png or Path(f"pinn_{task}.png"), args.setting, budget)
    return 0


if __name__ == "__main__":
    sys.exit(main())
