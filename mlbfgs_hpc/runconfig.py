"""What a resumed run does when its command line differs from the checkpoint's.

``mlbfgs-train`` stores its whole configuration in every checkpoint. On resume,
:func:`config_changes` lists every setting that differs, and the trainer logs one warning per
setting, ``--name: old -> new``, with what the change does. The rule is the one most
training tools follow: **the command line of the resumed run wins; the state continues.**

* **Run length** (``--steps``/``--epochs``) is the total length of the run, counted from step
  0: resuming with a larger value *extends* the run, a smaller one at or below the
  checkpoint's step finishes it without training.
* **The LR schedule** (run length, ``--lr``, ``--schedule``'s ``--step-size``/``--gamma``) is
  re-planned when any of its settings changed: from the resumed step on, the learning rate is
  the one a run started with the new settings would have at that step. The cosine of a
  15-step run resumed with ``--steps 30`` is the cosine of a 30-step run from step 15 on (the
  lr jumps from about 0 to half its peak), instead of the old plan's lr climbing back from 0.
  :func:`replan_schedule` does it for any schedule the trainer builds, by building the new
  one and stepping it to the current step.
* **Param-group settings** (``--weight-decay``; ``--momentum`` of ``mlbfgs`` and ``sgd``;
  ``--nesterov`` of ``sgd``; ``--tolerance-grad``/``--tolerance-change`` of ``lbfgs``;
  ``--line-search`` of ``lbfgs``, stored by torch as
  ``line_search_fn``/``max_eval``) are set on the loaded param groups; the other mL-BFGS
  hyper-parameters are the new optimizer's.
* Everything else (checkpointing, logging, device, ...) simply takes the new value.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from .options import lbfgs_search_settings

__all__ = ["SettingChange", "config_changes", "replan_schedule", "apply_group_settings",
           "apply_on_resume", "SCHEDULE_KEYS", "GROUP_KEYS", "NOT_COMPARED"]

logger = logging.getLogger("mlbfgs_hpc.train")  # these lines belong to the training log

SchedulerFactory = Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler | None]

#: Settings that shape the LR schedule: a change re-plans it.
SCHEDULE_KEYS: frozenset[str] = frozenset({"steps", "epochs", "lr", "step_size", "gamma",
                                           "warmup_steps", "muon_adamw_lr"})
#: Settings stored in the optimizer's param groups (set again after loading).
GROUP_KEYS: tuple[str, ...] = ("weight_decay", "momentum", "nesterov", "tolerance_grad",
                               "tolerance_change")
#: Keys of the stored configuration that are not settings a user changes (derived, or how
#: the resume itself is asked for).
NOT_COMPARED: frozenset[str] = frozenset({"resume", "total_steps", "world_size", "quiet"})


class SettingChange:
    """One setting that differs from the checkpoint's configuration.

    Args:
        key: the configuration key (an argparse destination, e.g. ``history_size``).
        old: the checkpoint's value.
        new: this run's value.
    """

    def __init__(self, *, key: str, old: Any, new: Any) -> None:
        self.key, self.old, self.new = key, old, new

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    def consequence(self) -> str:
        if self.key in SCHEDULE_KEYS:
            return ("the new value applies; the LR schedule is re-planned: from this step on "
                    "it is the one a run started with the new settings has")
        return "the new value applies"

    def __str__(self) -> str:
        return f"{self.flag}: {self.old!r} -> {self.new!r} ({self.consequence()})"

    def __repr__(self) -> str:
        return f"SettingChange(key={self.key!r}, old={self.old!r}, new={self.new!r})"


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]
                   ) -> tuple[list[SettingChange], list[str]]:
    """Settings that differ between a checkpoint's configuration and this run's.

    Args:
        saved: the configuration stored in the checkpoint.
        current: this run's configuration (same keys; JSON values).

    Returns:
        The changed settings, and the keys this run has that the checkpoint did not record
        (settings added since it was written: nothing to compare them with).
    """
    changes = [SettingChange(key=key, old=saved[key], new=value)
               for key, value in current.items()
               if key not in NOT_COMPARED and key in saved and saved[key] != value]
    unrecorded = [key for key in current if key not in NOT_COMPARED and key not in saved]
    return changes, unrecorded


def replan_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler,
                    optimizer: torch.optim.Optimizer, *, step: int,
                    initial_lrs: Sequence[float], build: SchedulerFactory) -> None:
    """Replace ``scheduler``'s plan by the one ``build`` makes, as it stands at ``step``.

    ``build`` makes the schedule for the run's (new) settings on a given optimizer. It is run
    on a stand-in optimizer whose param groups start at ``initial_lrs`` and stepped ``step``
    times, exactly as the new run would have been; its state then replaces ``scheduler``'s,
    and its learning rates those of ``optimizer``'s param groups.

    Args:
        scheduler: the trainer's scheduler, loaded from the checkpoint.
        optimizer: the optimizer it drives.
        step: the step the run resumes at (>= 0).
        initial_lrs: the peak learning rate of each param group (the new ``--lr``).
        build: the trainer's scheduler factory.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if len(initial_lrs) != len(optimizer.param_groups):
        raise ValueError(f"initial_lrs has {len(initial_lrs)} values for "
                         f"{len(optimizer.param_groups)} param groups")
    stand_in = torch.optim.SGD([{"params": [torch.zeros(1)], "lr": lr} for lr in initial_lrs])
    fresh = build(stand_in)
    if fresh is None:
        return
    with warnings.catch_warnings():
        # The stand-in optimizer never steps; torch warns about stepping a schedule first.
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            fresh.step()
    scheduler.load_state_dict(fresh.state_dict())
    for group, planned in zip(optimizer.param_groups, stand_in.param_groups):
        group["lr"] = planned["lr"]
        group["initial_lr"] = planned["initial_lr"]


def apply_group_settings(optimizer: torch.optim.Optimizer, changes: Sequence[SettingChange],
                         *, max_iter: int = 1) -> None:
    """Set changed param-group settings (:data:`GROUP_KEYS`, and ``--line-search`` as the
    entries :func:`~mlbfgs_hpc.options.lbfgs_search_settings` gives) on every group that has
    them: loading a state dict brings back the checkpoint's."""
    for change in changes:
        if change.new is None:  # the optimizer's own per-group defaults: keep the loaded ones
            continue
        entries = ({change.key: change.new} if change.key in GROUP_KEYS else
                   lbfgs_search_settings(change.new, max_iter=max_iter)
                   if change.key == "line_search" else {})
        for group in optimizer.param_groups:
            group.update({k: v for k, v in entries.items() if k in group})


def apply_on_resume(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                    optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None, step: int,
                    total_steps: int, lr: float, build_scheduler: SchedulerFactory,
                    report: bool, group_lrs: Sequence[float] | None = None
                    ) -> list[SettingChange]:
    """What the trainer does right after loading a checkpoint (the rule of this module).

    Logs one warning per changed setting (``report``: rank 0 only), sets changed (and
    unrecorded) param-group settings, and re-plans the LR schedule when a schedule setting
    changed and the run is not over yet.

    Args:
        saved: the configuration stored in the checkpoint.
        current: this run's configuration.
        optimizer: the loaded optimizer.
        scheduler: the loaded LR scheduler, or ``None``.
        step: the step the run resumes at.
        total_steps: this run's length in steps.
        lr: this run's peak learning rate (``--lr``, or the optimizer's default).
        group_lrs: the peak learning rate of each param group where they differ (muon's two
            halves); default ``lr`` for every group.
        build_scheduler: the trainer's scheduler factory.
        report: log the changes (rank 0).

    Returns:
        The changed settings.
    """
    changes, unrecorded = config_changes(saved, current)
    if report:
        for change in changes:
            logger.warning("resuming with a changed setting: %s", change)
        if unrecorded:
            logger.info("settings the checkpoint did not record (added since it was "
                        "written): %s", ", ".join(unrecorded))
    # A setting added since the checkpoint was written has nothing to compare with, but the
    # command line still wins: its param-group entries are this run's, not the loaded ones.
    added = [SettingChange(key=key, old=None, new=current[key]) for key in unrecorded]
    apply_group_settings(optimizer, [*changes, *added],
                         max_iter=current.get("max_iter") or 1)
    if (scheduler is not None and step < total_steps
            and any(c.key in SCHEDULE_KEYS for c in changes)):
        before = optimizer.param_groups[0]["lr"]
        replan_schedule(scheduler, optimizer, step=step,
                        initial_lrs=(list(group_lrs) if group_lrs is not None
                                     else [lr] * len(optimizer.param_groups)),
                        build=build_scheduler)
        if report:
            logger.warning("LR schedule re-planned for a %d-step run: lr at step %d is %.6g "
                           "(the checkpoint's plan: %.6g)", total_steps, step,
                           optimizer.param_groups[0]["lr"], before)
    return changes
