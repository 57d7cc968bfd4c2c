"""The training driver as the benchmarks use it: one :class:`BenchTrainer`, seven optimizers.

Fairness is the point of this module. Every optimizer, the driver's own (``mlbfgs``, ``sgd``,
``adam``, ``lbfgs``, ``adamw`` and ``muon``: torch's Muon with AdamW for what Muon is not
meant for) and the outside second-order peer (``shampoo``: pytorch-optimizer's
``ScalableShampoo``), runs through the *same* :class:`mlbfgs_hpc.train.Trainer`: the same
data (``GlobalBatchSampler`` order for the seed), the same model and initialisation, the same
loss scaling, the same cosine schedule, the same evaluation, the same ``metrics.jsonl``.
:class:`BenchTrainer` changes only four things, identically for every optimizer:

* ``_build_optimizer`` also knows ``shampoo`` (the rest goes to the driver unchanged);
* evaluation time is *excluded* from the ``time`` field of ``metrics.jsonl`` (evaluating the
  10k-image test set every quarter epoch would otherwise add ~25 % to every run alike and
  blur the comparison); the seconds spent evaluating are recorded separately;
* no checkpoints are written (they are benchmarked on their own);
* a run whose training loss turns non-finite stops there (``Diverged``) instead of computing
  NaNs to the end: the run is reported as diverged, and the budget goes to the others.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

from mlbfgs_hpc.comm import LocalCommunicator
from mlbfgs_hpc.train import Trainer, build_parser

logger = logging.getLogger(__name__)

#: Optimizers the benchmarks compare, in report order.
OPTIMIZERS: tuple[str, ...] = ("mlbfgs", "sgd", "adam", "lbfgs", "shampoo", "adamw", "muon")
#: Curvature refresh period shared by mL-BFGS (T) and Shampoo (preconditioner recompute).
CURVATURE_PERIOD = 50


def shampoo_optimizer(params: list[torch.nn.Parameter], *, lr: float,
                      weight_decay: float) -> torch.optim.Optimizer:
    """pytorch-optimizer's ScalableShampoo (Anil et al. 2020), configured for fairness.

    Plain ``pytorch_optimizer.Shampoo`` (Gupta et al. 2018; momentum 0.9, roots every 20
    steps) hit NaN within 60 steps on the CNN at lr 1e-3 and 5e-2 (presumably its ε·I-started
    statistics: an unseen direction of a matrix layer is scaled by up to ε^(-1/2) = 1000×,
    with no grafting to bound the step), so the peer is the scalable, grafted variant: SGD-grafted layer-wise norms, Nesterov momentum
    β1 = 0.9, statistics every step, inverse roots recomputed every ``CURVATURE_PERIOD`` steps
    (the same period as mL-BFGS's T) from step 25, 512-blocks for big layers.
    """
    from pytorch_optimizer import ScalableShampoo

    return ScalableShampoo(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay,
                           start_preconditioning_step=25,
                           preconditioning_compute_steps=CURVATURE_PERIOD)


class Diverged(RuntimeError):
    """The training loss became non-finite: the run stops and is reported as diverged."""


class BenchTrainer(Trainer):
    """:class:`~mlbfgs_hpc.train.Trainer` plus ``shampoo``, eval time excluded, no checkpoints,
    stop on a non-finite loss.

    Args:
        args: parsed ``mlbfgs-train`` arguments; ``args.optimizer`` may also be ``"shampoo"``.
        comm: the communicator (local for the benchmarks).
        stop_at: end the run after this many steps while keeping the learning-rate schedule
            of the full run (a *truncated* run: its first ``stop_at`` steps are exactly those
            of the full run). ``None``: run to the end.
    """

    def __init__(self, *, args: argparse.Namespace, comm: LocalCommunicator,
                 stop_at: int | None = None) -> None:
        if stop_at is not None and stop_at < 1:
            raise ValueError(f"stop_at must be None or >= 1, got {stop_at}")
        self.eval_seconds = 0.0
        super().__init__(args=args, comm=comm)
        self.full_steps = self.total_steps
        if stop_at is not None:
            # The scheduler was built for the full length above; only the loop ends sooner.
            self.total_steps = min(stop_at, self.total_steps)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        if self.args.optimizer != "shampoo":
            return super()._build_optimizer()
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.reducer = self.comm.gradient_reducer(named, backend=self.args.grad_backend)
        return shampoo_optimizer([p for _, p in named], lr=self.lr,
                                 weight_decay=self.args.weight_decay)

    def evaluate(self) -> tuple[float, float]:
        start = time.monotonic()
        try:
            return super().evaluate()
        finally:
            self.eval_seconds += time.monotonic() - start

    def _elapsed(self) -> float:
        return super()._elapsed() - self.eval_seconds

    def _checkpoint(self, *, final: bool = False) -> None:
        del final

    def _log_metrics(self, handle: Any, epoch: int, window: list[float]) -> None:
        super()._log_metrics(handle, epoch, window)
        if not math.isfinite(window[0]):
            raise Diverged(f"non-finite training loss at step {self.step}")


def make_args(*, optimizer: str, model: str, dataset: str, lr: float, seed: int,
              epochs: float | None = None, steps: int | None = None, run_dir: str,
              eval_every: int = 0, log_every: int = 10, threads: int = 1,
              extra: list[str] | None = None) -> argparse.Namespace:
    """``mlbfgs-train`` arguments for one benchmark run (``optimizer`` may be ``shampoo``)."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    argv = ["--optimizer", "sgd" if optimizer == "shampoo" else optimizer,
            "--model", model, "--dataset", dataset, "--lr", repr(lr), "--seed", str(seed),
            "--run-dir", run_dir, "--resume", "never", "--eval-every", str(eval_every),
            "--log-every", str(log_every), "--threads", str(threads), "--quiet"]
    if steps is not None:
        argv += ["--steps", str(steps)]
    elif epochs is not None:
        argv += ["--epochs", repr(epochs)]
    argv += extra or []
    args = build_parser().parse_args(argv)
    args.optimizer = optimizer  # argparse's choices know only the driver's own optimizers
    return args


def run_training(args: argparse.Namespace, *, stop_at: int | None = None) -> dict[str, Any]:
    """Run one training (to ``stop_at`` steps if given) in this process; return eval seconds
    and the exit code."""
    trainer = BenchTrainer(args=args, comm=LocalCommunicator(), stop_at=stop_at)
    code = trainer.run()
    return {"exit_code": code, "eval_seconds": trainer.eval_seconds,
            "total_steps": trainer.total_steps, "schedule_steps": trainer.full_steps}
