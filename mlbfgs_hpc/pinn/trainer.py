"""``mlbfgs-train --pde TASK``: a physics-informed network, on one process or many ranks.

The collocation points come from ``--seed`` (the same on every rank); each rank takes its
contiguous shard of every point set (or, with ``--collocation-batch``, its shard of a fresh
global subset each step, the same subset whatever the number of ranks). The loss a rank's
closure returns is its share of the global loss times the number of ranks, so the average
over ranks (the optimizers', Horovod's) is the loss of the whole set::

    rank r:  L_r = p · [ Σ_shard pde² / N  +  w · Σ_shard constraint² / N_c ]
    mean_r L_r = Σ pde² / N + w · Σ constraint² / N_c          (the PINN loss)

Per step (one ``optimizer.step()``: Adam's one iteration, L-BFGS's up to ``--max-iter``), the
records carry the loss at the step's start, the closure evaluations so far (``func_evals``,
all phases) and the training time; every evaluation adds the relative L2 error against the
task's reference solution (``rel_l2``). Evaluation time is not training time: ``time``
excludes it, so runs of different optimizers compare in the seconds they spent training.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import torch

from ..cli import UsageError
from ..comm import LocalCommunicator
from ..data import GlobalBatchSampler
from ..optimizer import MLBFGS
from ..run_loop import TrainingRun
from ..seeding import seed_everything
from .model import PinnMLP
from .points import POINT_SETS, CollocationPoints
from .problem import pinn_loss, pinn_residuals, relative_l2
from .problems import PROBLEMS

logger = logging.getLogger("mlbfgs_hpc.train")

#: Offsets of the mini-batch samplers' seeds, per point set (distinct streams).
_SAMPLER_SEED_OFFSET = {"interior": 0, "constraint": 1, "periodic": 2}


class PINNTrainer(TrainingRun):
    """One PINN run (see the module docstring).

    Args:
        args: parsed ``mlbfgs-train`` arguments with ``--pde``.
        comm: the communicator (local or MPI).
    """

    def __init__(self, *, args: argparse.Namespace, comm: LocalCommunicator) -> None:
        self._start(args=args, comm=comm)
        weight = {} if args.constraint_weight is None else {
            "constraint_weight": args.constraint_weight}
        self.problem = PROBLEMS[args.pde](**weight)
        sizes = self.problem.defaults
        n_interior = args.collocation or sizes.n_interior
        n_constraint = args.boundary_points or sizes.n_constraint
        # The whole set, the same on every rank (it depends on the seed only; drawn in
        # float64 and cast, so --dtype float64 trains on the float32 run's points).
        self.dtype = getattr(torch, args.dtype or "float32")
        self.points = self.problem.sample(
            n_interior=n_interior, n_constraint=n_constraint, dtype=self.dtype,
            generator=torch.Generator().manual_seed(args.seed)).to(self.device)
        self.samplers = self._batch_samplers(args.collocation_batch)
        if self.samplers is None:
            self.local_points = self.points.shard(rank=comm.rank, world_size=comm.size)
            self.steps_per_epoch = 1
        else:
            self.steps_per_epoch = self.samplers["interior"].batches_per_epoch
        self.total_steps = (args.steps if args.steps is not None
                            else max(1, round(args.epochs * self.steps_per_epoch)))
        if args.warmup_steps is None:   # resolved here, so checkpoints record the number
            args.warmup_steps = 0
        seed_everything(args.seed)
        self.model = PinnMLP(input_dim=self.problem.input_dim, width=args.width or sizes.width,
                             depth=args.depth or sizes.depth, lower=self.problem.lower,
                             upper=self.problem.upper).to(self.device, self.dtype)
        self.func_evals = 0        # closure evaluations, every phase (identical on all ranks)
        self.eval_seconds = 0.0    # time spent evaluating (not training time)
        self.last_rel_l2 = math.nan
        self._finish_setup()

    # ---- data -------------------------------------------------------------------------------
    def _batch_samplers(self, batch: int) -> dict[str, GlobalBatchSampler] | None:
        """A sampler per non-empty point set with ``--collocation-batch``: interior ``batch``
        points a step, the others in proportion (at least one); ``None`` for full batch."""
        if not batch:
            return None
        sizes = self.points.sizes
        if batch > sizes["interior"]:
            raise UsageError(f"--collocation-batch {batch} is more than the "
                             f"{sizes['interior']} interior points (--collocation)")
        samplers = {}
        for name, size in sizes.items():
            if size:
                share = batch if name == "interior" else max(
                    1, round(batch * size / sizes["interior"]))
                samplers[name] = GlobalBatchSampler(
                    dataset_size=size, global_batch_size=share,
                    seed=self.args.seed + _SAMPLER_SEED_OFFSET[name], rank=self.comm.rank,
                    world_size=self.comm.size)
        return samplers

    def _step_points(self) -> tuple[CollocationPoints, dict[str, int]]:
        """This rank's points of the current step and the global number of residuals of
        each kind (``pde``, ``constraint``)."""
        if self.samplers is None:
            sizes = self.points.sizes
            return self.local_points, {"pde": sizes["interior"],
                                       "constraint": sizes["constraint"] + sizes["periodic"]}
        indices, totals = {}, {}
        for name in POINT_SETS:
            sampler = self.samplers.get(name)
            if sampler is None:
                indices[name] = torch.zeros(0, dtype=torch.long)
                totals[name] = 0
                continue
            epoch, batch_index = divmod(self.step, sampler.batches_per_epoch)
            indices[name] = sampler.local_indices(epoch, batch_index)
            totals[name] = sampler.global_batch_len(batch_index)
        return (self.points.select(**indices),
                {"pde": totals["interior"], "constraint": totals["constraint"] +
                 totals["periodic"]})

    # ---- one step -------------------------------------------------------------------------
    def _train_step(self) -> list[float]:
        """One optimizer step; returns this rank's share of the loss at the step's start and
        the step count (1 on rank 0), summed over ranks by the loop."""
        points, totals = self._step_points()
        p = self.comm.size
        optimizer = self.optimizer
        # torch's L-BFGS compares the closure's values: every rank must see the global loss.
        # (MLBFGS averages the ranks' own values itself.)
        torch_search = (isinstance(optimizer, torch.optim.LBFGS)
                        and optimizer.param_groups[0].get("line_search_fn") is not None)
        first: list[float] = []

        def closure() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=False)
            with torch.enable_grad():
                pde, constraint = pinn_residuals(self.problem, self.model, points)
                loss = p * pinn_loss(pde, constraint, weight=self.problem.constraint_weight,
                                     n_pde_total=totals["pde"],
                                     n_constraint_total=totals["constraint"])
                loss.backward()
            self.func_evals += 1
            if self.reducer is not None:
                self.reducer.synchronize()
            local = loss.detach()
            if not first:
                first.append(float(local) / p)
            if torch_search and p > 1:
                total = float(self.comm.allgather_scalars([float(local)]).sum(axis=0)[0])
                return torch.tensor(total / p, dtype=local.dtype)
            return local

        if isinstance(optimizer, torch.optim.LBFGS) or (
                isinstance(optimizer, MLBFGS) and optimizer.line_search is not None):
            optimizer.step(closure)
        else:
            closure()
            optimizer.step()
        return [first[0], 1.0 if self.comm.rank == 0 else 0.0]

    # ---- evaluation and records ---------------------------------------------------------------
    def evaluate(self) -> float:
        """The relative L2 error against the reference (the same model on every rank: each
        computes it, no communication); not counted as training time."""
        start = time.monotonic()
        try:
            self.last_rel_l2 = relative_l2(self.model, self.problem)
            return self.last_rel_l2
        finally:
            self.eval_seconds += time.monotonic() - start

    def _elapsed(self) -> float:
        return super()._elapsed() - self.eval_seconds

    def _counters(self) -> dict[str, Any]:
        # func_evals is the run's own count (every phase), not the current optimizer's.
        return {k: v for k, v in super()._counters().items() if k != "func_evals"}

    def _epoch_ended(self) -> bool:
        return self.step % self.steps_per_epoch == 0

    def _train_record(self, window: list[float]) -> dict[str, Any]:
        return {"epoch": self.step / self.steps_per_epoch,
                "loss": window[0] / max(window[1], 1.0), "func_evals": self.func_evals}

    def _bar_fields(self, step_sums: list[float]) -> dict[str, str]:
        return {"loss": f"{step_sums[0]:.3e}", "rel_l2": f"{self.last_rel_l2:.2e}"}

    def _bar_label(self) -> str:
        return f"{self.optimizer_name}/{self.args.pde}"

    def _eval_record(self) -> dict[str, Any]:
        rel_l2 = self.evaluate()
        return {"epoch": self.step / self.steps_per_epoch, "rel_l2": rel_l2,
                "func_evals": self.func_evals}

    def _summary_record(self) -> dict[str, Any]:
        return {"rel_l2": self.evaluate(), "pde": self.args.pde,
                "total_func_evals": self.func_evals}

    def _summary_text(self, record: dict[str, Any]) -> str:
        return f"relative L2 error {record['rel_l2']:.3e}, {self.func_evals} closure evaluations"

    def _checkpoint_extra(self) -> dict[str, Any]:
        return {"func_evals": self.func_evals}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        self.func_evals = int(extra.get("func_evals", 0))
