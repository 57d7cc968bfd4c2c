"""What every ``mlbfgs-train`` run does, whatever it trains: the step loop, checkpoints,
signals, resume, the optimizer switch and the outputs.

A task (classification in :mod:`mlbfgs_hpc.train`, PINNs in :mod:`mlbfgs_hpc.pinn.trainer`)
subclasses :class:`TrainingRun` and supplies its data and model, one training step, its
evaluation and its metric records. Per step, on every rank::

    task: one optimizer step on this rank's share   -> this rank's metric sums
    scheduler step; the optimizer switch, at --switch-at
    ONE allgather: metric sums, stop flag (a signal on any rank), rank 0's clock decisions
    rank 0: progress bar, metrics.jsonl; every rank: evaluation and checkpoint when due

Every rank takes the same decision at the same step, so no rank waits alone in a
collective. The optimizer switch (the PINN recipe: Adam, then L-BFGS) happens as the step
counter reaches ``--switch-at``, before that step's checkpoint, so a checkpoint always holds the
optimizer that runs the next step, and a run resumed across the switch continues bit for bit.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from . import checkpoint as ckpt
from . import runconfig
from .baselines import MuonWithAdamW, build_baseline
from .cli import UsageError, given_tolerances, print_usage_error
from .comm import GradientReducer, LocalCommunicator
from .device import resolve_device
from .divergence import DivergenceReport, TrainingDivergedError
from .optimizer import MLBFGS
from .options import NODE_AWARE_CHOICES, lbfgs_search_settings
from .signals import EXIT_DIVERGED, EXIT_OK, EXIT_REQUEUE, StopRequest, process_age_seconds

logger = logging.getLogger("mlbfgs_hpc.train")


class TrainingRun:
    """One training run of ``mlbfgs-train``: the parts every task shares.

    A subclass's ``__init__`` calls :meth:`_start` (threads, device), builds its data and model
    and sets :attr:`total_steps`, then calls :meth:`_finish_setup` (optimizer, scheduler,
    clocks). It implements :meth:`_train_step`, :meth:`evaluate`, :meth:`_train_record`,
    :meth:`_eval_record`, :meth:`_epoch_ended` and :meth:`_checkpoint_extra`.

    Args:
        args: parsed ``mlbfgs-train`` arguments.
        comm: the communicator (local or MPI).
    """

    model: torch.nn.Module
    total_steps: int

    def _start(self, *, args: argparse.Namespace, comm: LocalCommunicator) -> None:
        self.args = args
        self.comm = comm
        self.run_dir = Path(args.run_dir)
        threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, comm.local_size))
        torch.set_num_threads(threads)
        self.device = resolve_device(args.device, local_rank=comm.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        logger.info("%d rank(s); rank 0 trains on %s", comm.size, self.device)

    def _finish_setup(self) -> None:
        a = self.args
        # Same seed on every rank gives the same initialisation; broadcast to be certain.
        self.comm.broadcast_tensors_(list(self.model.parameters()) + list(self.model.buffers()))
        self.lr = a.lr   # resolved by the parser (options.resolve_defaults)
        self.reducer: GradientReducer | None = None
        self.grad_norm = math.nan   # a baseline's gradient norm before --max-grad-norm
        self.phase = 0   # 1 once --switch-at has switched the optimizer
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        self.step = 0
        self.start_time = time.monotonic()
        # --stop-after counts from the process start: the walltime it is derived from does.
        self.process_start = self.start_time - process_age_seconds()
        self.elapsed_before = 0.0  # training seconds of earlier runs (from the checkpoint)
        self._checkpointed_step = -1

    # ---- optimizers ---------------------------------------------------------------------
    @property
    def optimizer_name(self) -> str:
        """The optimizer of the current phase (``--switch-to`` after the switch)."""
        return self.args.switch_to if self.phase else self.args.optimizer

    def _build_optimizer(self) -> torch.optim.Optimizer:
        a, name = self.args, self.optimizer_name
        lr = a.switch_lr if self.phase else self.lr
        if self.reducer is not None:   # the previous phase's hooks
            self.reducer.remove_hooks()
            self.reducer = None
        if name == "mlbfgs":
            from .blocks import build_blocks
            search = {} if a.line_search == "none" else {
                "line_search_fn": a.line_search, "max_iter": a.max_iter,
                **given_tolerances(a)}
            return MLBFGS(
                self.model.parameters(), blocks=build_blocks(self.model, block_size=a.block_size),
                lr=lr, weight_decay=a.weight_decay, history_size=a.history_size,
                update_freq=a.update_freq, beta_param=a.beta_param, beta_grad=a.beta_grad,
                damping=a.damping, sigma_low=a.sigma_low, sigma_high=a.sigma_high,
                curvature_eps=a.curvature_eps, clip=a.clip, kl_clip=a.kl_clip,
                momentum=a.momentum, nesterov=a.nesterov, pair_momentum=a.pair_momentum,
                double_damping=a.double_damping, max_grad_norm=a.max_grad_norm,
                comm=self.comm, grad_backend=a.grad_backend, grad_reduce=a.grad_reduce,
                node_aware=NODE_AWARE_CHOICES[a.node_aware], **search)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.reducer = self.comm.gradient_reducer(named, backend=a.grad_backend)
        try:
            return build_baseline(
                name, model=self.model, params=[p for _, p in named], lr=lr,
                momentum=a.momentum, nesterov=a.nesterov, weight_decay=a.weight_decay,
                adamw_lr=getattr(a, "muon_adamw_lr", None), history_size=a.history_size,
                max_iter=a.max_iter,
                lbfgs_settings=lbfgs_search_settings(a.line_search, max_iter=a.max_iter,
                                                     **given_tolerances(a)))
        except ValueError as exc:  # e.g. muon on a model without hidden linear layers
            raise UsageError(f"--optimizer {name}: {exc}") from exc

    def _peak_lrs(self) -> list[float]:
        """The lr each param group's schedule starts from (muon: two, one per half)."""
        if isinstance(self.optimizer, MuonWithAdamW):
            return self.optimizer.peak_lrs(lr=self.lr, adamw_lr=self.args.muon_adamw_lr)
        lr = self.args.switch_lr if self.phase else self.lr
        return [lr] * len(self.optimizer.param_groups)

    def _build_scheduler(self, optimizer: torch.optim.Optimizer | None = None
                         ) -> torch.optim.lr_scheduler.LRScheduler | None:
        a = self.args
        optimizer = self.optimizer if optimizer is None else optimizer
        if self.phase:   # after the switch: L-BFGS at its own constant lr
            return None
        sched = torch.optim.lr_scheduler
        warmup = a.warmup_steps
        if warmup < 0 or warmup >= self.phase_steps:
            raise UsageError(f"--warmup-steps must be in [0, {self.phase_steps}) (the run's "
                             f"steps), got {warmup}")
        main: sched.LRScheduler | None = None
        if a.schedule == "cosine":
            main = sched.CosineAnnealingLR(optimizer, T_max=self.phase_steps - warmup)
        elif a.schedule == "step":
            step_size = a.step_size or max(1, (self.phase_steps - warmup) // 3)
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

    @property
    def phase_steps(self) -> int:
        """Steps of the first phase: the whole run, or the steps before ``--switch-at``."""
        switch = self.args.switch_at
        return self.total_steps if switch is None else min(switch, self.total_steps)

    def _switch(self) -> None:
        """From the first optimizer to ``--switch-to`` (its own, fresh state)."""
        self.phase = 1
        self.optimizer = self._build_optimizer()
        self.scheduler = self._build_scheduler()
        logger.info("step %d: switched to %s", self.step, self.optimizer_name)

    def _run_config(self) -> dict[str, Any]:
        """The run's settings as JSON values (checkpoints store them; an infinite value,
        e.g. ``--sigma-high`` with a line search, as the string ``"inf"``)."""
        config = {**vars(self.args), "world_size": self.comm.size,
                  "total_steps": self.total_steps, "lr": self.lr}
        return {key: (str(value) if isinstance(value, float) and math.isinf(value) else value)
                for key, value in config.items()}

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
        if self.args.switch_at is not None and not self.phase:
            # A checkpoint at or after the switch holds the second optimizer's state.
            saved_step = self.comm.broadcast_object(
                _saved_step(path) if self.comm.rank == 0 else None)
            if saved_step is not None and saved_step >= self.args.switch_at:
                self._switch()
        # The changed settings are reported below, one line per flag (runconfig).
        loaded = ckpt.load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                      comm=self.comm, scheduler=self.scheduler,
                                      warn_changed_settings=False)
        self.step = int(loaded.step)
        self.elapsed_before = float(loaded.extra.get("elapsed_seconds", 0.0))
        self._restore_extra(loaded.extra)
        self._checkpointed_step = self.step
        logger.info("resumed from %s at step %d (written on %d ranks, now %d)",
                    loaded.path, self.step, loaded.world_size, self.comm.size)
        runconfig.apply_on_resume(
            loaded.config, self._run_config(), optimizer=self.optimizer,
            scheduler=self.scheduler, step=self.step, total_steps=self.total_steps,
            lr=self.args.switch_lr if self.phase else self.lr, group_lrs=self._peak_lrs(),
            build_scheduler=self._build_scheduler, report=self.comm.rank == 0)
        if self.step >= self.total_steps:
            logger.info("the run in %s already reached its %d steps: evaluating only (pass "
                        "--resume never or another --run-dir to train again)",
                        self.run_dir, self.total_steps)

    def _loop(self, stop: StopRequest) -> int:
        a, comm = self.args, self.comm
        metrics = self._open_metrics()
        last_ckpt_time = time.monotonic()
        bar = self._progress_bar()
        window: list[float] | None = None   # metric sums since the last log line
        self.model.train()
        while self.step < self.total_steps:
            try:
                sums = self._train_step()
            except TrainingDivergedError as exc:   # raised on every rank at this step
                if bar is not None:
                    bar.close()
                return self._diverged(exc, metrics)
            self.step += 1
            if self.scheduler is not None:
                self.scheduler.step()
            if a.switch_at is not None and self.step == a.switch_at and not self.phase:
                self._switch()
            if a.step_sleep:
                time.sleep(a.step_sleep)
            now = time.monotonic()
            time_due = (a.checkpoint_minutes > 0 and comm.rank == 0 and
                        now - last_ckpt_time >= 60.0 * a.checkpoint_minutes)
            out_of_time = (a.stop_after > 0 and comm.rank == 0 and
                           now - self.process_start >= a.stop_after)
            # One collective per step: metrics, the stop flag and rank 0's clock decisions.
            gathered = comm.allgather_scalars(
                [*sums, float(stop.requested or out_of_time), float(time_due)])
            totals = [float(v) for v in gathered.sum(axis=0)]
            step_sums, (signalled, time_due_any) = totals[:-2], totals[-2:]
            window = step_sums if window is None else [w + s for w, s in
                                                       zip(window, step_sums)]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(self._bar_fields(step_sums), refresh=False)
            if self.step % a.log_every == 0 or self.step == self.total_steps:
                self._log_metrics(metrics, 0, window)
                window = None
            if (a.eval_every and self.step % a.eval_every == 0) or (
                    not a.eval_every and self._epoch_ended()):
                self._log_eval(metrics)
            if (signalled > 0 or time_due_any > 0
                    or (a.checkpoint_every and self.step % a.checkpoint_every == 0)):
                self._checkpoint()
                last_ckpt_time = time.monotonic()
            if signalled > 0:
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
        record = self._summary_record()
        if comm.rank == 0:
            summary = {"event": "summary", "step": self.step, **record,
                       "train_seconds": self._elapsed(), "optimizer": self.optimizer_name,
                       "world_size": comm.size, **self._counters()}
            self._write_metric(metrics, summary)
            logger.info("done: %d steps, %s, %.1f s training", self.step,
                        self._summary_text(record), self._elapsed())
        return EXIT_OK

    # ---- task hooks -------------------------------------------------------------------------
    def _train_step(self) -> list[float]:
        """One optimizer step at ``self.step``; returns this rank's metric sums (summed over
        ranks and steps for :meth:`_train_record`)."""
        raise NotImplementedError

    def evaluate(self) -> Any:
        raise NotImplementedError

    def _epoch_ended(self) -> bool:
        """Whether ``self.step`` ends an epoch (evaluation when ``--eval-every 0``)."""
        raise NotImplementedError

    def _train_record(self, window: list[float]) -> dict[str, Any]:
        """The ``train`` record's task fields from the summed metric window."""
        raise NotImplementedError

    def _bar_fields(self, step_sums: list[float]) -> dict[str, str]:
        """The progress bar's fields after one step (summed over ranks)."""
        raise NotImplementedError

    def _eval_record(self) -> dict[str, Any]:
        """Evaluate; the ``eval`` record's task fields (identical on every rank)."""
        raise NotImplementedError

    def _summary_record(self) -> dict[str, Any]:
        """The final evaluation's fields of the ``summary`` record."""
        raise NotImplementedError

    def _summary_text(self, record: dict[str, Any]) -> str:
        raise NotImplementedError

    def _checkpoint_extra(self) -> dict[str, Any]:
        """Task facts stored with each checkpoint (JSON values)."""
        return {}

    def _restore_extra(self, extra: dict[str, Any]) -> None:
        """Take back what :meth:`_checkpoint_extra` stored (on resume)."""
        del extra

    # ---- checkpoints and outputs ----------------------------------------------------------
    def _checkpoint(self, *, final: bool = False) -> None:
        start = time.monotonic()
        path = ckpt.save_checkpoint(
            self.run_dir, step=self.step, model=self.model, optimizer=self.optimizer,
            comm=self.comm, scheduler=self.scheduler, keep=self.args.keep,
            config=self._run_config(),
            extra={**self._checkpoint_extra(), "seed": self.args.seed,
                   "elapsed_seconds": self._elapsed(), "final": final, "phase": self.phase})
        self._checkpointed_step = self.step
        logger.info("checkpoint %s written in %.2f s", path, time.monotonic() - start)

    def _diverged(self, exc: TrainingDivergedError, metrics: Any) -> int:
        """One line naming the last good checkpoint (rank 0), and :data:`EXIT_DIVERGED`."""
        if self.comm.rank == 0:
            report = DivergenceReport.of(exc, failed_step=self.step + 1, run_dir=self.run_dir,
                                         checkpoints=[(i.step, i.path) for i in
                                                      ckpt.list_checkpoints(self.run_dir)
                                                      if i.valid])
            self._write_metric(metrics, report.record())
            print_usage_error("mlbfgs-train", report.message(), rank=0)
        return EXIT_DIVERGED

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
                    dynamic_ncols=True, desc=self._bar_label())

    def _bar_label(self) -> str:
        return self.optimizer_name

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
        del epoch
        if handle is None:
            return
        record = {"event": "train", "step": self.step, **self._train_record(window),
                  "lr": self.optimizer.param_groups[0]["lr"], "time": self._elapsed(),
                  **self._counters()}
        self._write_metric(handle, record)

    def _log_eval(self, handle: Any) -> None:
        record = self._eval_record()
        if self.comm.rank == 0:
            self._write_metric(handle, {"event": "eval", "step": self.step, **record,
                                        "time": self._elapsed()})


def _saved_step(path: str) -> int | None:
    """The step of the checkpoint ``path`` resolves to; ``None`` when it cannot be read
    (:func:`~mlbfgs_hpc.checkpoint.load_checkpoint` then reports why, on every rank)."""
    try:
        return int(ckpt.read_manifest(ckpt.resolve_checkpoint(path))["step"])
    except ckpt.CheckpointError:
        return None
