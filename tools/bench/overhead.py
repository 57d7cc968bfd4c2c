"""Per-iteration cost of mL-BFGS against SGD-momentum (and the other optimizers), and where
the optimizer step's time goes.

Whole iteration = the driver's own ``Trainer._train_step`` (index the batch, forward,
backward, ``optimizer.step()``, read the loss back), on the same model, data and batch for
every optimizer, one process. Protocol:

1. Build one :class:`~driver.BenchTrainer` per optimizer (same seed: same model, same
   batches). Warm mL-BFGS up until its ring is full (``(m+1)·T`` steps with T = 50, m = 10:
   the first pair forms at 2T), so the timed steps apply H with the full 10 pairs.
2. Repeat R times: for each optimizer, in an order rotated every repeat, time a window of
   exactly T consecutive steps (so every mL-BFGS window contains one pair formation: the
   amortised cost is included). The ratio of each window to SGD's window *of the same
   repeat* is one sample; the report gives median and quartiles over the R samples.
3. Breakdown: the *unmodified* ``MLBFGS.step`` runs with its private pieces wrapped by
   timers on the instance (``_gather_owned``, ``_apply_weight_decay``,
   ``_update_momentum_buffers``, ``_form_pairs`` (:mod:`mlbfgs_hpc.pairs`),
   ``BatchedCurvature.precondition_`` ("H·g":
   H·g of every owned block at once, with the per-block gᵀg, gᵀd, dᵀd), ``_apply_outer_momentum``,
   the communicator's collectives). What the step does inline (the read-back, the step-size
   guard and grafting, the copy of the direction out, snapshot copies, counters,
   ``_foreach_sub_`` of the update) is the remainder "guard + inline".
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from mlbfgs_hpc.comm import LocalCommunicator
from mlbfgs_hpc.optimizer import MLBFGS

from . import common
from .driver import CURVATURE_PERIOD, OPTIMIZERS, BenchTrainer, make_args

logger = logging.getLogger(__name__)

#: The step-time configurations: (label, model, dataset, extra mlbfgs-train arguments). The
#: 8-layer transformer has 52 blocks (one per layer): the case where a per-block step would
#: cost most (issue 12); width 32 and batch 32 keep its iteration near 0.15 s here (width 64
#: at batch 128: 0.9 s, too slow for the 1,650 timed iterations of the protocol), and lr 0.01
#: for every optimizer keeps it finite (at the TIMING_LR values SGD and mL-BFGS diverged
#: within 5 steps, and skipped steps time nothing).
CONFIGS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("cnn/fashion-mnist", "cnn", "fashion-mnist", ()),
    ("mlp/digits", "mlp", "digits", ()),
    ("transformer-d8w32-b32/python-stdlib", "transformer", "python-stdlib",
     ("--depth", "8", "--width", "32", "--batch-size", "32", "--lr", "0.01")),
)
#: Learning rates for the timing runs (the driver's defaults; timing does not depend on them
#: as long as nothing diverges, which the result records).
TIMING_LR = {"mlbfgs": 0.1, "sgd": 0.05, "adam": 1e-3, "lbfgs": 0.1, "shampoo": 0.05,
             "adamw": 1e-3, "muon": 0.02}
HISTORY = 10

_PIECES = ("gather", "weight decay", "momentum update", "pair update", "H·g",
           "outer momentum", "collectives", "guard + inline")


class _Stepper:
    """Drives a trainer one training iteration at a time, through the driver's own code.

    Args:
        trainer: the trainer whose ``_train_step`` is the timed iteration.
    """

    def __init__(self, *, trainer: BenchTrainer) -> None:
        self.trainer = trainer
        self.per_epoch = trainer.sampler.batches_per_epoch

    def steps(self, count: int) -> float:
        """Run ``count`` iterations; return the seconds they took."""
        tr = self.trainer
        start = time.perf_counter()
        for _ in range(count):
            epoch, batch = divmod(tr.step, self.per_epoch)
            idx = tr.sampler.local_indices(epoch, batch)
            tr._train_step(idx, tr.sampler.global_batch_len(batch))
            tr.step += 1
        return time.perf_counter() - start


def _build(optimizer: str, model: str, dataset: str, threads: int, run_dir: str,
           period: int, extra_args: tuple[str, ...] = ()) -> _Stepper:
    args = make_args(optimizer=optimizer, model=model, dataset=dataset,
                     lr=TIMING_LR[optimizer], seed=0, steps=10**9, run_dir=run_dir,
                     threads=threads,
                     extra=["--history-size", str(HISTORY),
                            "--update-freq", str(period), "--schedule", "none", *extra_args])
    return _Stepper(trainer=BenchTrainer(args=args, comm=LocalCommunicator()))


def _instrument(opt: MLBFGS, sink: dict[str, float]) -> Callable[[], None]:
    """Wrap the optimizer's pieces with timers that add into ``sink``; return an undo.

    On a GPU every timer synchronises the device, so each piece is charged its own kernels
    (the breakdown windows are separate from the ratio windows, which run unsynchronised).
    """
    undo: list[Callable[[], None]] = []
    sync = torch.cuda.synchronize if opt._device.type == "cuda" else None

    def wrap(owner: Any, attr: str, piece: str) -> None:
        undo.append(common.add_timer(owner, attr, sink, piece, sync=sync))

    wrap(opt, "_gather_owned", "gather")
    wrap(opt, "_apply_weight_decay", "weight decay")
    wrap(opt, "_update_momentum_buffers", "momentum update")
    wrap(opt, "_form_pairs", "pair update")
    wrap(opt, "_apply_outer_momentum", "outer momentum")
    # H·g of all owned blocks at once, with the per-block gᵀg, gᵀd, dᵀd (batched.py).
    wrap(opt._stochastic.batched, "precondition_", "H·g")
    # The communicator is shared (one per trainer); on one rank its collectives are no-ops
    # whose Python call overhead is still part of the step.
    for attr in ("allgather_scalars", "allgatherv_"):
        wrap(opt.comm, attr, "collectives")
    wrap(opt, "step", "step total")

    def restore() -> None:
        for fn in undo:
            fn()

    return restore


def measure_config(label: str, model: str, dataset: str, *, repeats: int, threads: int,
                   period: int = CURVATURE_PERIOD,
                   optimizers: tuple[str, ...] = OPTIMIZERS,
                   extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """Ratios of whole-iteration time to SGD's, and the mL-BFGS step breakdown.

    ``period`` is mL-BFGS's T and the window length (50 for the report; ``--quick`` uses 10
    so the ring fills in 110 steps instead of 550). ``extra_args`` go to every trainer's
    ``mlbfgs-train`` arguments (``--device cuda``, ``--data-root DIR``). Each iteration ends
    with the driver reading the loss back (``float``), so on a GPU every timed step has
    finished its kernels when its clock stops.
    """
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        steppers = {name: _build(name, model, dataset, threads, f"{tmp}/{name}", period,
                                 extra_args)
                    for name in optimizers}
        ml = steppers["mlbfgs"].trainer.optimizer
        assert isinstance(ml, MLBFGS)
        n_blocks = len(ml.blocks)
        warm_start = time.perf_counter()
        # mL-BFGS's warm-up (steps 1..2T, no pair yet: SGD-like direction) timed against the
        # same number of SGD steps, for the normalised time-to-accuracy clock.
        warm_ml = steppers["mlbfgs"].steps(2 * period)
        warm_sgd = steppers["sgd"].steps(2 * period)
        # Fill the ring: pairs form at 2T, 3T, …; (m+1)·T steps give m pairs per block.
        steppers["mlbfgs"].steps((HISTORY - 1) * period)
        for name, st in steppers.items():
            if name not in ("mlbfgs", "sgd"):
                st.steps(period)
        warm_seconds = time.perf_counter() - warm_start
        windows: dict[str, list[float]] = defaultdict(list)
        order = list(optimizers)
        for r in range(repeats):
            rotated = order[r % len(order):] + order[:r % len(order)]
            for name in rotated:
                windows[name].append(steppers[name].steps(period) / period)
        iteration_ms = {name: common.summarize(1e3 * t for t in ts)
                        for name, ts in windows.items()}
        ratio = {name: common.summarize(t / s for t, s in zip(ts, windows["sgd"]))
                 for name, ts in windows.items()}

        # Breakdown of the mL-BFGS step (same trainer, more windows, pieces timed).
        sink: dict[str, float] = defaultdict(float)
        restore = _instrument(ml, sink)
        per_window: list[dict[str, float]] = []
        sgd_step: list[float] = []
        sgd_opt = steppers["sgd"].trainer.optimizer
        sgd_sink: dict[str, float] = defaultdict(float)
        original_sgd_step = sgd_opt.step

        def sgd_timed(*a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return original_sgd_step(*a, **k)
            finally:
                sgd_sink["step"] += time.perf_counter() - start

        sgd_opt.step = sgd_timed  # type: ignore[method-assign]
        bd_iter: list[float] = []
        for _ in range(3):
            sink.clear()
            t_iter = steppers["mlbfgs"].steps(period)
            bd_iter.append(t_iter / period)
            piece = {k: v / period for k, v in sink.items()}
            inner = sum(v for k, v in piece.items() if k != "step total")
            piece["guard + inline"] = piece.get("step total", 0.0) - inner
            per_window.append(piece)
            sgd_sink.clear()
            steppers["sgd"].steps(period)
            sgd_step.append(sgd_sink["step"] / period)
        restore()
        del sgd_opt.step
        breakdown = {p: common.summarize(1e3 * w.get(p, 0.0) for w in per_window)
                     for p in (*_PIECES, "step total")}
        step_share = common.summarize(w["step total"] / it for w, it in
                                      zip(per_window, bd_iter))
        counters = ml.counters
        finite = {name: all(torch.isfinite(p).all() for p in st.trainer.model.parameters())
                  for name, st in steppers.items()}
    result = {
        "label": label, "model": model, "dataset": dataset, "threads": threads,
        "device": str(steppers["mlbfgs"].trainer.device),
        "batch_size": steppers["mlbfgs"].trainer.args.batch_size, "history": HISTORY, "update_freq": period, "repeats": repeats,
        "window_steps": period, "warmup_seconds": warm_seconds,
        "parameters": sum(p.numel() for p in steppers["mlbfgs"].trainer.model.parameters()),
        "blocks": n_blocks, "mlbfgs_counters": counters, "params_finite": finite,
        "iteration_ms": iteration_ms, "ratio_to_sgd": ratio,
        # One sample each (the first 2T steps of each run, cold start included).
        "mlbfgs_warmup_iteration_ms": 1e3 * warm_ml / (2 * period),
        "sgd_warmup_iteration_ms": 1e3 * warm_sgd / (2 * period),
        "mlbfgs_warmup_ratio_to_sgd": warm_ml / warm_sgd,
        "mlbfgs_warmup_steps": 2 * period,
        "breakdown_ms_per_step": breakdown,
        "mlbfgs_step_share_of_iteration": step_share,
        "sgd_step_ms": common.summarize(1e3 * t for t in sgd_step),
        "mlbfgs_step_over_sgd_step": common.summarize(
            w["step total"] / s for w, s in zip(per_window, sgd_step)),
    }
    logger.info("%s: iteration mlbfgs/sgd = %s; step %s ms (H·g %s ms); pairs "
                "accepted %d", label, common.fmt_stat(ratio["mlbfgs"]),
                common.fmt_stat(breakdown["step total"]),
                common.fmt_stat(breakdown["H·g"]), counters["accepted_pairs"])
    return result


def run(*, quick: bool, threads: int,
        configs: tuple[tuple[str, str, str, tuple[str, ...]], ...] = CONFIGS,
        optimizers: tuple[str, ...] = OPTIMIZERS) -> dict[str, Any]:
    start = time.perf_counter()
    out = {"configs": [measure_config(label, model, dataset, threads=threads,
                                      repeats=3 if quick else 10,
                                      period=10 if quick else CURVATURE_PERIOD,
                                      optimizers=optimizers, extra_args=extra)
                       for label, model, dataset, extra in configs]}
    out["seconds"] = time.perf_counter() - start
    return out


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    """``overhead.png``: iteration / SGD per optimizer, and the mL-BFGS step's pieces."""
    plt = common.use_agg_backend()
    configs = res["configs"]
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 3.8), dpi=90,
                             gridspec_kw={"width_ratios": [1.0, 1.25]})
    ax = axes[0]
    opts = list(configs[0]["ratio_to_sgd"])
    width = 0.8 / len(configs)
    for i, cfg in enumerate(configs):
        meds = [cfg["ratio_to_sgd"][o]["median"] for o in opts]
        lo = [m - cfg["ratio_to_sgd"][o]["q1"] for m, o in zip(meds, opts)]
        hi = [cfg["ratio_to_sgd"][o]["q3"] - m for m, o in zip(meds, opts)]
        xs = [j + (i - (len(configs) - 1) / 2) * width for j in range(len(opts))]
        ax.bar(xs, meds, width, yerr=[lo, hi], capsize=2, label=cfg["label"])
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(1.1, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(opts)), opts)
    ax.set_ylabel("whole iteration / SGD (median, IQR)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    pieces = [p for p in configs[0]["breakdown_ms_per_step"] if p != "step total"]
    totals = [c["breakdown_ms_per_step"]["step total"]["median"] for c in configs]
    labels = [f"{c['label']}\nstep {t:.2f} ms\n(SGD step {c['sgd_step_ms']['median']:.2f} ms)"
              for c, t in zip(configs, totals)]
    lefts = [0.0] * len(configs)
    for piece in pieces:
        vals = [100 * c["breakdown_ms_per_step"][piece]["median"] / t
                for c, t in zip(configs, totals)]
        ax.barh(labels, vals, left=lefts, label=piece)
        lefts = [a + b for a, b in zip(lefts, vals)]
    ax.set_xlabel("share of the mL-BFGS step (%, medians)")
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = out / "overhead.png"
    fig.savefig(path)
    plt.close(fig)
    return [path]
