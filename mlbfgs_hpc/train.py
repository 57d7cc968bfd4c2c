"""``mlbfgs-train``: train a classifier on real data (or a PINN, ``--pde``) with mL-BFGS or a
baseline, 1 to N ranks.

The same command runs everywhere::

    mlbfgs-train                                   # embedded default: Fashion-MNIST, small CNN
    mpirun -np 4 mlbfgs-train --run-dir runs/a     # 4 ranks, gradients reduce-scattered
    srun --mpi=pmix -n 8 mlbfgs-train --run-dir runs/a --checkpoint-every 200

Per step, every rank takes its shard of the same global batch (the order depends only on the
seed, so it is part of the checkpoint and independent of the number of ranks), the gradients
are averaged, the optimizer steps, and one small all-gather carries the loss/accuracy sums,
the stop flag (a signal on any rank) and the "time-based checkpoint due" flag of rank 0, so
every rank takes the same decision at the same step. Rank 0 alone logs, shows a progress bar
and writes ``metrics.jsonl``; every rank writes its checkpoint shard.
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import cli
from .cli import UsageError
from .comm import LauncherError, LocalCommunicator, init_communicator
from .data import DatasetSplit, GlobalBatchSampler, load_dataset, shard_bounds
from .models import SEQUENCE_MODELS, build_model
from .optimizer import MLBFGS
from .options import build_parser, default_warmup_steps
from .rundir import RunDirBusyError, hold_run_dir
from .run_loop import TrainingRun
from .seeding import seed_everything
from .signals import StopRequest

__all__ = ["main", "Trainer", "build_parser", "default_warmup_steps", "LocalCommunicator"]

logger = logging.getLogger("mlbfgs_hpc.train")


def main(argv: list[str] | None = None) -> int:
    """The ``mlbfgs-train`` process: parse, train, return the exit code (see ``signals``).

    Meant to end the process: the SIGUSR1/SIGTERM listener is installed before the slow
    start-up (MPI/Horovod, data, resume), so that an early scheduler warning means "checkpoint
    after the first step" rather than SIGUSR1's default action, death; and SIGUSR1 is left
    IGNORED on return, so that a warning arriving once the exit code is decided (during the
    seconds of interpreter, Horovod and MPI shutdown) cannot turn 0 or 99 into 138. Embedders
    wanting their handlers back use :meth:`Trainer.run`, which restores them.
    Exit code 2 (one line from rank 0): a bad flag value, missing data, a busy run directory,
    several processes started without MPI (``horovodrun`` on Gloo). Exit code 3 (one line
    from rank 0): the run diverged (:class:`~mlbfgs_hpc.divergence.TrainingDivergedError`).
    """
    args = build_parser().parse_args(argv)
    if not cli.train_args_ok(args):
        return 2
    stop = StopRequest()
    try:
        try:
            comm = init_communicator()
        except LauncherError as exc:
            cli.print_usage_error("mlbfgs-train", str(exc), rank=cli.launcher_rank())
            return 2
        _setup_logging(comm.rank)
        try:
            with hold_run_dir(args.run_dir, comm):
                return build_trainer(args=args, comm=comm).run(stop=stop)
        except ckpt.CheckpointError as exc:
            logger.error("%s", exc)
            return 1
        except (UsageError, RunDirBusyError) as exc:
            cli.print_usage_error("mlbfgs-train", str(exc), rank=comm.rank)
            return 2
    finally:
        # Not the listener: Python resets its own handlers to the default action while it
        # shuts down. A first SIGTERM then still terminates, as it should.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def build_trainer(*, args: argparse.Namespace, comm: LocalCommunicator) -> TrainingRun:
    """The run the arguments ask for: a PINN (``--pde``) or a classifier."""
    if args.pde is not None:
        from .pinn.trainer import PINNTrainer
        return PINNTrainer(args=args, comm=comm)
    return Trainer(args=args, comm=comm)


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


class Trainer(TrainingRun):
    """One classification run: data, model, optimizer, schedule, checkpoints, signals.

    Args:
        args: parsed ``mlbfgs-train`` arguments.
        comm: the communicator (local or MPI).
    """

    def __init__(self, *, args: argparse.Namespace, comm: LocalCommunicator) -> None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        self._start(args=args, comm=comm)
        self.train_set = self._load("train").to(self.device)
        self.test_set = self._load("test").to(self.device)
        try:
            self.sampler = GlobalBatchSampler(
                dataset_size=len(self.train_set), global_batch_size=args.batch_size,
                seed=args.seed, rank=comm.rank, world_size=comm.size)
        except ValueError as exc:  # e.g. a global batch larger than the training set
            raise UsageError(f"--batch-size {args.batch_size}: {exc}") from exc
        steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = (args.steps if args.steps is not None
                            else max(1, round(args.epochs * steps_per_epoch)))
        if args.warmup_steps is None:  # resolved here, so checkpoints record the number
            args.warmup_steps = default_warmup_steps(self.total_steps)

        if (args.model in SEQUENCE_MODELS) != self.train_set.is_sequence:
            raise UsageError(f"--model {args.model} cannot train on --dataset {args.dataset}: "
                             f"the transformer needs token data (python-stdlib), the other "
                             f"models need images")
        #: Loss terms per sample: 1 per image, one per position of a token sequence.
        self.targets_per_sample = self.train_set.targets_per_sample

        seed_everything(args.seed)  # torch, CUDA, numpy, random: the same seed on every rank
        # Built on the CPU, then moved: the initial weights depend only on the seed, not on
        # the device, so a CPU and a GPU run start from the same point.
        self.model = build_model(args.model, in_shape=self.train_set.in_shape,
                                 num_classes=self.train_set.num_classes,
                                 **self._model_options()).to(self.device)
        self._finish_setup()

    # ---- set-up -------------------------------------------------------------------------
    def _model_options(self) -> dict[str, int]:
        a = self.args
        options = {}
        if a.width is not None:
            if a.model not in ("resnet18", "transformer"):
                raise UsageError(f"--width applies to resnet18 and transformer, not {a.model}")
            options["width"] = a.width
        if a.depth is not None:
            if a.model != "transformer":
                raise UsageError(f"--depth applies to the transformer, not {a.model}")
            options["depth"] = a.depth
        return options

    def _load(self, split: str) -> DatasetSplit:
        try:
            return load_dataset(self.args.dataset, split=split,  # type: ignore[arg-type]
                                root=self.args.data_root, seed=self.args.seed,
                                synthetic_size=self.args.synthetic_size)
        except (OSError, ValueError, ImportError) as exc:  # missing or unreadable input data
            raise UsageError(f"--dataset {self.args.dataset}: {exc}") from exc

    # ---- one step -------------------------------------------------------------------------
    def _train_step(self) -> list[float]:
        """One optimizer step on this rank's share of the step's global batch. Returns this
        rank's loss sum, number of correct predictions and loss terms."""
        epoch, batch_index = divmod(self.step, self.sampler.batches_per_epoch)
        idx = self.sampler.local_indices(epoch, batch_index).to(self.device)
        global_len = self.sampler.global_batch_len(batch_index)
        loss_sum, correct = self._optimize(idx, global_len * self.targets_per_sample)
        return [loss_sum, correct, float(len(idx) * self.targets_per_sample)]

    def _optimize(self, idx: torch.Tensor, global_targets: int) -> tuple[float, float]:
        """One optimizer step on this rank's samples ``idx``; ``global_targets`` loss terms
        (samples × targets per sample) make up the global batch. Returns this rank's loss
        sum and number of correct predictions."""
        x, y = self.train_set.x[idx], self.train_set.y[idx].reshape(-1)
        scale = self.comm.size / global_targets
        # What torch will use: the param group's entry (a resume may have changed it).
        line_search = self.optimizer.param_groups[0].get("line_search_fn") is not None
        searched_mlbfgs = isinstance(self.optimizer, MLBFGS) and \
            self.optimizer.line_search is not None
        first: list[tuple[float, float]] = []  # the step's metrics: at its starting point

        def closure() -> torch.Tensor:
            self.optimizer.zero_grad(set_to_none=False)
            with torch.enable_grad():
                out = _flat_logits(self.model(x))
                loss_sum = F.cross_entropy(out, y, reduction="sum")
                (loss_sum * scale).backward()
            if self.reducer is not None:
                self.reducer.synchronize()
            if self.args.max_grad_norm is not None and not isinstance(self.optimizer, MLBFGS):
                # The baselines' gradients are averaged on every rank by now (allreduce), so
                # every rank clips by the same factor. (MLBFGS clips inside its step.)
                self.grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    self.model.parameters(), self.args.max_grad_norm))
            # detach(): float() of a tensor that requires grad warns on every step.
            local = float(loss_sum.detach())
            if not first:
                first.append((local, float((out.argmax(1) == y).sum())))
            if line_search and not searched_mlbfgs:
                # The search compares losses: every rank must see the global batch's loss,
                # bitwise the same (summed in rank order), or the ranks would take different
                # decisions and different numbers of collectives. (MLBFGS averages the ranks'
                # own losses itself.)
                total = float(self.comm.allgather_scalars([local]).sum(axis=0)[0])
                return torch.tensor(total / global_targets, dtype=loss_sum.dtype)
            return loss_sum.detach() * scale

        if isinstance(self.optimizer, torch.optim.LBFGS) or searched_mlbfgs:
            self.optimizer.step(closure)
        else:
            closure()
            self.optimizer.step()
        return first[0]

    # ---- evaluation and records -------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy, the test set sharded over ranks."""
        was_training = self.model.training
        self.model.eval()
        lo, hi = shard_bounds(len(self.test_set), rank=self.comm.rank,
                              world_size=self.comm.size)
        loss_sum = correct = 0.0
        for start in range(lo, hi, 1024):
            stop = min(hi, start + 1024)
            out = _flat_logits(self.model(self.test_set.x[start:stop]))
            y = self.test_set.y[start:stop].reshape(-1)
            loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
            correct += float((out.argmax(1) == y).sum())
        totals = self.comm.allgather_scalars([loss_sum, correct]).sum(axis=0)
        self.model.train(was_training)
        n = len(self.test_set) * self.targets_per_sample
        return float(totals[0]) / n, float(totals[1]) / n

    def _epoch_ended(self) -> bool:
        return self.step % self.sampler.batches_per_epoch == 0

    def _train_record(self, window: list[float]) -> dict[str, Any]:
        samples = max(window[2], 1.0)
        return {"epoch": self.step / self.sampler.batches_per_epoch,
                "loss": window[0] / samples, "accuracy": window[1] / samples}

    def _bar_fields(self, step_sums: list[float]) -> dict[str, str]:
        return {"loss": f"{step_sums[0] / max(step_sums[2], 1):.4f}"}

    def _bar_label(self) -> str:
        return f"{self.optimizer_name}/{self.args.model}"

    def _eval_record(self) -> dict[str, Any]:
        test_loss, test_acc = self.evaluate()
        epoch = self.step / self.sampler.batches_per_epoch
        if self.comm.rank == 0:
            logger.info("step %d (epoch %d): test accuracy %.2f%%, loss %.4f",
                        self.step, math.ceil(epoch), 100 * test_acc, test_loss)
        return {"epoch": epoch, "test_loss": test_loss, "test_accuracy": test_acc}

    def _summary_record(self) -> dict[str, Any]:
        test_loss, test_acc = self.evaluate()
        return {"test_loss": test_loss, "test_accuracy": test_acc,
                "model": self.args.model, "dataset": self.args.dataset}

    def _summary_text(self, record: dict[str, Any]) -> str:
        return (f"test accuracy {100 * record['test_accuracy']:.2f}%, "
                f"test loss {record['test_loss']:.4f}")

    def _checkpoint_extra(self) -> dict[str, Any]:
        epoch, batch_index = divmod(self.step, self.sampler.batches_per_epoch)
        return {"epoch": epoch, "batch_index": batch_index}


def _flat_logits(out: torch.Tensor) -> torch.Tensor:
    """Logits as ``(targets, classes)``: a sequence model's ``(N, L, V)`` becomes
    ``(N·L, V)``, matching its targets flattened to ``(N·L,)``."""
    return out.flatten(0, -2) if out.dim() > 2 else out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
