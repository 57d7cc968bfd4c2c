"""``mlbfgs-train``: train a model on real data with mL-BFGS or a baseline, 1 to N ranks.

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
import json
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import cli, runconfig
from .baselines import MuonWithAdamW, build_baseline
from .blocks import build_blocks
from .cli import UsageError
from .comm import GradientReducer, LauncherError, LocalCommunicator, init_communicator
from .data import DatasetSplit, GlobalBatchSampler, load_dataset, shard_bounds
from .device import resolve_device
from .models import SEQUENCE_MODELS, build_model
from .optimizer import MLBFGS
from .options import (DEFAULT_LR, NODE_AWARE_CHOICES, build_parser, default_warmup_steps,
                      lbfgs_search_settings, resolve_optimizer_defaults)
from .rundir import RunDirBusyError, hold_run_dir
from .seeding import seed_everything
from .signals import EXIT_OK, EXIT_REQUEUE, StopRequest, process_age_seconds

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
    several processes started without MPI (``horovodrun`` on Gloo).
    """
    args = resolve_optimizer_defaults(build_parser().parse_args(argv))
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
                return Trainer(args=args, comm=comm).run(stop=stop)
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


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")


class Trainer:
    """One training run: data, model, optimizer, schedule, checkpoints, signals.

    Args:
        args: parsed ``mlbfgs-train`` arguments.
        comm: the communicator (local or MPI).
    """

    def __init__(self, *, args: argparse.Namespace, comm: LocalCommunicator) -> None:
        if args.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
        self.args = resolve_optimizer_defaults(args)  # in place: checkpoints record them
        self.comm = comm
        self.run_dir = Path(args.run_dir)
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, comm.local_size))
        torch.set_num_threads(threads)
        self.device = resolve_device(args.device, local_rank=comm.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        logger.info("%d rank(s); rank 0 trains on %s", comm.size, self.device)

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
        # Same seed on every rank gives the same initialisation; broadcast to be certain.
        comm.broadcast_tensors_(list(self.model.parameters()) + list(self.model.buffers()))
        self.lr = args.lr if args.lr is not None else DEFAULT_LR[args.optimizer]
        self.reducer: GradientReducer | None = None
        self.grad_norm = math.nan   # a baseline's gradient norm before --max-grad-norm
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.step = 0
        self.start_time = time.monotonic()
        # --stop-after counts from the process start: the walltime it is derived from does.
        self.process_start = self.start_time - process_age_seconds()
        self.elapsed_before = 0.0  # training seconds of earlier runs (from the checkpoint)
        self._checkpointed_step = -1

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

    def _build_optimizer(self) -> torch.optim.Optimizer:
        a = self.args
        if a.optimizer == "mlbfgs":
            return MLBFGS(
                self.model.parameters(), blocks=build_blocks(self.model, block_size=a.block_size),
                lr=self.lr, weight_decay=a.weight_decay, history_size=a.history_size,
                update_freq=a.update_freq, beta_param=a.beta_param, beta_grad=a.beta_grad,
                damping=a.damping, sigma_low=a.sigma_low, sigma_high=a.sigma_high,
                curvature_eps=a.curvature_eps, clip=a.clip, kl_clip=a.kl_clip,
                momentum=a.momentum, nesterov=a.nesterov, pair_momentum=a.pair_momentum,
                double_damping=a.double_damping, max_grad_norm=a.max_grad_norm,
                comm=self.comm, grad_backend=a.grad_backend, grad_reduce=a.grad_reduce,
                node_aware=NODE_AWARE_CHOICES[a.node_aware])
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.reducer = self.comm.gradient_reducer(named, backend=a.grad_backend)
        try:
            return build_baseline(
                a.optimizer, model=self.model, params=[p for _, p in named], lr=self.lr,
                momentum=a.momentum, nesterov=a.nesterov, weight_decay=a.weight_decay,
                adamw_lr=getattr(a, "muon_adamw_lr", None), history_size=a.history_size,
                lbfgs_settings=lbfgs_search_settings(a.line_search))
        except ValueError as exc:  # e.g. muon on a model without hidden linear layers
            raise UsageError(f"--optimizer {a.optimizer}: {exc}") from exc

    def _peak_lrs(self) -> list[float]:
        """The lr each param group's schedule starts from (muon: two, one per half)."""
        if isinstance(self.optimizer, MuonWithAdamW):
            return self.optimizer.peak_lrs(lr=self.lr, adamw_lr=self.args.muon_adamw_lr)
        return [self.lr] * len(self.optimizer.param_groups)

    def _build_scheduler(self, optimizer: torch.optim.Optimizer | None = None
                         ) -> torch.optim.lr_scheduler.LRScheduler | None:
        a = self.args
        optimizer = self.optimizer if optimizer is None else optimizer
        sched = torch.optim.lr_scheduler
        warmup = a.warmup_steps
        if warmup < 0 or warmup >= self.total_steps:
            raise UsageError(f"--warmup-steps must be in [0, {self.total_steps}) (the run's "
                             f"steps), got {warmup}")
        main: sched.LRScheduler | None = None
        if a.schedule == "cosine":
            main = sched.CosineAnnealingLR(optimizer, T_max=self.total_steps - warmup)
        elif a.schedule == "step":
            step_size = a.step_size or max(1, (self.total_steps - warmup) // 3)
            main = sched.StepLR(optimizer, step_size=step_size, gamma=a.gamma)
        if not warmup:
            return main
        # Linear warm-up from lr/warmup to lr over the first steps, then the main schedule
        # over the rest (large global batches need it: Goyal et al. 2017).
        ramp = sched.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0,
                              total_iters=warmup)
        if main is None:
            return ramp
        return sched.SequentialLR(optimizer, schedulers=[ramp, main], milestones=[warmup])

    def _run_config(self) -> dict[str, Any]:
        return {**vars(self.args), "world_size": self.comm.size,
                "total_steps": self.total_steps, "lr": self.lr}

    # ---- the run --------------------------------------------------------------------------
    def run(self, *, stop: StopRequest | None = None) -> int:
        """Resume if asked, train, checkpoint; return the exit code (see ``signals``).

        Args:
            stop: the signal listener to obey; ``None`` installs one for this call.
        """
        own = stop is None
        stop = StopRequest() if stop is None else stop
        try:
            self._maybe_resume()
            return self._loop(stop)
        finally:
            if own:
                stop.restore()

    def _maybe_resume(self) -> None:
        mode = self.args.resume
        if mode == "never":
            return
        if mode == "auto":
            found = ckpt.find_latest_valid(self.run_dir) if self.comm.rank == 0 else None
            path = self.comm.broadcast_object(str(found) if found else None)
            if path is None:
                logger.info("no checkpoint in %s: starting from scratch", self.run_dir)
                return
        else:
            path = mode
        loaded = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                      comm=self.comm, scheduler=self.scheduler)
        self.step = int(loaded.step)
        self.elapsed_before = float(loaded.extra.get("elapsed_seconds", 0.0))
        self._checkpointed_step = self.step
        logger.info("resumed from %s at step %d (written on %d ranks, now %d)",
                    loaded.path, self.step, loaded.world_size, self.comm.size)
        runconfig.apply_on_resume(
            loaded.config, self._run_config(), optimizer=self.optimizer,
            scheduler=self.scheduler, step=self.step, total_steps=self.total_steps,
            lr=self.lr, group_lrs=self._peak_lrs(), build_scheduler=self._build_scheduler,
            report=self.comm.rank == 0)
        if self.step >= self.total_steps:
            logger.info("the run in %s already reached its %d steps: evaluating only (pass "
                        "--resume never or another --run-dir to train again)",
                        self.run_dir, self.total_steps)

    def _loop(self, stop: StopRequest) -> int:
        a, comm = self.args, self.comm
        metrics = self._open_metrics()
        steps_per_epoch = self.sampler.batches_per_epoch
        last_ckpt_time = time.monotonic()
        bar = self._progress_bar()
        window = [0.0, 0.0, 0.0]  # loss sum, correct, samples since the last log line
        self.model.train()
        while self.step < self.total_steps:
            epoch, batch_index = divmod(self.step, steps_per_epoch)
            idx = self.sampler.local_indices(epoch, batch_index).to(self.device)
            global_len = self.sampler.global_batch_len(batch_index)
            loss_sum, correct = self._train_step(idx, global_len * self.targets_per_sample)
            self.step += 1
            if self.scheduler is not None:
                self.scheduler.step()
            if a.step_sleep:
                time.sleep(a.step_sleep)
            now = time.monotonic()
            time_due = (a.checkpoint_minutes > 0 and comm.rank == 0 and
                        now - last_ckpt_time >= 60.0 * a.checkpoint_minutes)
            out_of_time = (a.stop_after > 0 and comm.rank == 0 and
                           now - self.process_start >= a.stop_after)
            # One collective per step: metrics, the stop flag and rank 0's clock decisions.
            gathered = comm.allgather_scalars(
                [loss_sum, correct, float(len(idx) * self.targets_per_sample),
                 float(stop.requested or out_of_time),
                 float(time_due)])
            totals = gathered.sum(axis=0)
            for j in range(3):
                window[j] += float(totals[j])
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.4f}", refresh=False)
            if self.step % a.log_every == 0 or self.step == self.total_steps:
                self._log_metrics(metrics, epoch, window)
                window = [0.0, 0.0, 0.0]
            epoch_end = self.step % steps_per_epoch == 0
            if (a.eval_every and self.step % a.eval_every == 0) or (not a.eval_every
                                                                     and epoch_end):
                self._log_eval(metrics, epoch)
            signalled = bool(totals[3] > 0)
            if (signalled or bool(totals[4] > 0)
                    or (a.checkpoint_every and self.step % a.checkpoint_every == 0)):
                self._checkpoint()
                last_ckpt_time = time.monotonic()
            if signalled:
                if bar is not None:
                    bar.close()
                logger.warning("stop requested (signal or --stop-after): checkpoint at step %d "
                               "written, "
                               "exiting with %d (rerun to resume)", self.step, EXIT_REQUEUE)
                return EXIT_REQUEUE
        if bar is not None:
            bar.close()
        if self.step != self._checkpointed_step:
            self._checkpoint(final=True)
        test_loss, test_acc = self.evaluate()
        if comm.rank == 0:
            summary = {"event": "summary", "step": self.step, "test_loss": test_loss,
                       "test_accuracy": test_acc, "train_seconds": self._elapsed(),
                       "optimizer": a.optimizer, "model": a.model, "dataset": a.dataset,
                       "world_size": comm.size, **self._counters()}
            self._write_metric(metrics, summary)
            logger.info("done: %d steps, test accuracy %.2f%%, test loss %.4f, %.1f s "
                        "training", self.step, 100 * test_acc, test_loss, self._elapsed())
        return EXIT_OK

    def _train_step(self, idx: torch.Tensor, global_targets: int) -> tuple[float, float]:
        """One optimizer step on this rank's samples ``idx``; ``global_targets`` loss terms
        (samples × targets per sample) make up the global batch. Returns this rank's loss
        sum and number of correct predictions."""
        x, y = self.train_set.x[idx], self.train_set.y[idx].reshape(-1)
        scale = self.comm.size / global_targets
        # What torch will use: the param group's entry (a resume may have changed it).
        line_search = self.optimizer.param_groups[0].get("line_search_fn") is not None
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
            if line_search:
                # The search compares losses: every rank must see the global batch's loss,
                # bitwise the same (summed in rank order), or the ranks would take different
                # decisions and different numbers of collectives.
                total = float(self.comm.allgather_scalars([local]).sum(axis=0)[0])
                return torch.tensor(total / global_targets, dtype=loss_sum.dtype)
            return loss_sum.detach() * scale

        if isinstance(self.optimizer, torch.optim.LBFGS):
            self.optimizer.step(closure)
        else:
            closure()
            self.optimizer.step()
        return first[0]

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

    def _checkpoint(self, *, final: bool = False) -> None:
        epoch, batch_index = divmod(self.step, self.sampler.batches_per_epoch)
        start = time.monotonic()
        path = ckpt.save_checkpoint(
            self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer,
            comm=self.comm, scheduler=self.scheduler, keep=self.args.keep,
            config=self._run_config(),
            extra={"epoch": epoch, "batch_index": batch_index, "seed": self.args.seed,
                   "elapsed_seconds": self._elapsed(), "final": final})
        self._checkpointed_step = self.step
        logger.info("checkpoint %s written in %.2f s", path, time.monotonic() - start)

    # ---- output -------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.start_time

    def _counters(self) -> dict[str, Any]:
        clipping = {} if self.args.max_grad_norm is None else {
            "grad_norm": (self.optimizer.last_grad_norm if isinstance(self.optimizer, MLBFGS)
                          else self.grad_norm)}
        return {**clipping, **self._optimizer_counters()}

    def _optimizer_counters(self) -> dict[str, Any]:
        if isinstance(self.optimizer, MLBFGS):
            return {**{k: v for k, v in self.optimizer.counters.items() if k != "step"},
                    **self.optimizer.diagnostics}
        if isinstance(self.optimizer, torch.optim.LBFGS):
            # Forward/backward passes so far: more than one per step with a line search.
            state = self.optimizer.state[self.optimizer.param_groups[0]["params"][0]]
            return {"func_evals": int(state.get("func_evals", 0))}
        return {}

    def _progress_bar(self) -> Any:
        if self.comm.rank != 0 or self.args.quiet:
            return None
        from tqdm import tqdm
        # disable=None: tqdm hides itself when stderr is not a terminal (batch jobs, CI).
        return tqdm(total=self.total_steps, initial=self.step, disable=None, unit="step",
                    dynamic_ncols=True, desc=f"{self.args.optimizer}/{self.args.model}")

    def _open_metrics(self) -> Any:
        if self.comm.rank != 0:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def _write_metric(self, handle: Any, record: dict[str, Any]) -> None:
        if handle is not None:
            handle.write(json.dumps(record) + "\n")
            handle.flush()

    def _log_metrics(self, handle: Any, epoch: int, window: list[float]) -> None:
        if handle is None:
            return
        samples = max(window[2], 1.0)
        record = {"event": "train", "step": self.step,
                  "epoch": self.step / self.sampler.batches_per_epoch,
                  "loss": window[0] / samples, "accuracy": window[1] / samples,
                  "lr": self.optimizer.param_groups[0]["lr"], "time": self._elapsed(),
                  **self._counters()}
        del epoch
        self._write_metric(handle, record)

    def _log_eval(self, handle: Any, epoch: int) -> None:
        test_loss, test_acc = self.evaluate()
        if self.comm.rank == 0:
            self._write_metric(handle, {
                "event": "eval", "step": self.step,
                "epoch": self.step / self.sampler.batches_per_epoch,
                "test_loss": test_loss, "test_accuracy": test_acc, "time": self._elapsed()})
            logger.info("step %d (epoch %d): test accuracy %.2f%%, loss %.4f",
                        self.step, epoch + 1, 100 * test_acc, test_loss)


def _flat_logits(out: torch.Tensor) -> torch.Tensor:
    """Logits as ``(targets, classes)``: a sequence model's ``(N, L, V)`` becomes
    ``(N·L, V)``, matching its targets flattened to ``(N·L,)``."""
    return out.flatten(0, -2) if out.dim() > 2 else out


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
