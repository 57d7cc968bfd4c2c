"""Command-line plumbing of ``mlbfgs-train``: usage errors as one line, ``--help`` without
doubled defaults, and the checks of every flag value before anything starts.

A value that cannot work (``--lr -1``, ``--history-size 0``, a ``--data-root`` that does not
exist) ends the command with one line on stderr, printed by rank 0 only, naming the flag (or
path) and what is allowed, and exit code 2, like argparse's own errors; never a traceback on
every rank. Genuine internal errors are not :class:`UsageError` and keep their traceback.

The checks run before MPI/Horovod start (ranks know their number from the launcher's
environment), so a bad command line under ``mpirun``/``srun`` ends at once on every rank.
A new flag gets its check by a line in :data:`FLAG_RULES` (or, for an mL-BFGS
hyper-parameter, by being a field of :class:`~mlbfgs_hpc.config.MLBFGSConfig` with the same
name as the flag's destination).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from .config import (MLBFGSConfig, check_searched_config, check_searched_group,
                     validate_momentum)

__all__ = ["UsageError", "HelpFormatter", "ArgumentParser", "launcher_rank",
           "print_usage_error", "validate_train_args", "train_args_ok", "FLAG_RULES"]

# Rank variables of the launchers comm.py recognises (Open MPI, PMIx/srun, MPICH/Hydra,
# MVAPICH), horovodrun's on Gloo (refused, by rank 0 alone), and SLURM's own task id last:
# processes that horovodrun starts from a batch script all inherit the script's
# SLURM_PROCID=0, so HOROVOD_RANK must be read before it or every one of them reports.
_RANK_VARIABLES: tuple[str, ...] = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK",
                                    "MV2_COMM_WORLD_RANK", "HOROVOD_RANK", "SLURM_PROCID")


class UsageError(ValueError):
    """A command-line value (or input path) that cannot work; reported as one line, exit 2."""


def launcher_rank() -> int:
    """This process's rank from the launcher's environment (0 without a launcher)."""
    for name in _RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


def print_usage_error(prog: str, message: str, *, rank: int) -> None:
    """``PROG: error: MESSAGE`` on stderr, from rank 0 only (the other ranks stay silent)."""
    if rank == 0:
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.stderr.flush()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to a flag's help only when it says something: not for ``None``
    or ``False`` defaults, and not when the help text already describes its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("%(default)" in text or "default" in text.lower() or not action.option_strings
                or action.default in (None, False, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line from rank 0 (no usage block repeated by every
    rank), then exit 2."""

    def error(self, message: str) -> NoReturn:
        print_usage_error(self.prog, f"{message} (see {self.prog} --help)",
                          rank=launcher_rank())
        sys.exit(2)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


#: ``(destination, check, what is allowed)`` for every flag of mlbfgs-train with a range.
FLAG_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("epochs", _optional(lambda v: _finite(v) and v > 0), "a number > 0"),
    ("steps", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("lr", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("step_size", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("gamma", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("weight_decay", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("momentum", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("muon_adamw_lr", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("block_size", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("seed", lambda v: 0 <= v < 2**32, "an integer in [0, 2**32)"),
    ("checkpoint_every", lambda v: v >= 0, "an integer >= 0 (0: off)"),
    ("checkpoint_minutes", lambda v: _finite(v) and v >= 0, "a number >= 0 (0: off)"),
    ("keep", lambda v: v >= 1, "an integer >= 1"),
    ("stop_after", lambda v: _finite(v) and v >= 0, "a number of seconds >= 0 (0: off)"),
    ("step_sleep", lambda v: _finite(v) and v >= 0, "a number of seconds >= 0"),
    ("log_every", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("eval_every", lambda v: v >= 0, "an integer >= 0 (0: every epoch)"),
    ("synthetic_size", lambda v: v >= 1, "an integer >= 1"),
    ("threads", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("max_grad_norm", _optional(lambda v: _finite(v) and v > 0), "a finite number > 0"),
    ("max_iter", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("tolerance_grad", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("tolerance_change", _optional(lambda v: _finite(v) and v >= 0), "a finite number >= 0"),
    ("collocation", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("boundary_points", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("collocation_batch", lambda v: v >= 0, "an integer >= 0 (0: full batch)"),
    ("constraint_weight", _optional(lambda v: _finite(v) and v > 0), "a finite number > 0"),
    ("switch_at", _optional(lambda v: v >= 1), "an integer >= 1"),
    ("switch_lr", lambda v: _finite(v) and v > 0, "a finite number > 0"),
)


def flag(dest: str) -> str:
    """The command-line spelling of an argparse destination (``history_size`` ->
    ``--history-size``)."""
    return "--" + dest.replace("_", "-")


def validate_train_args(args: argparse.Namespace) -> None:
    """Check every ``mlbfgs-train`` value before anything starts.

    Raises:
        UsageError: the first bad value, naming its flag (or path) and what is allowed.
    """
    for dest, check, allowed in FLAG_RULES:
        if hasattr(args, dest) and not check(getattr(args, dest)):
            raise UsageError(f"{flag(dest)} must be {allowed}, got {getattr(args, dest)!r}")
    optimizer = getattr(args, "optimizer", "mlbfgs")
    second = getattr(args, "switch_to", None) if getattr(args, "switch_at", None) else None
    if optimizer == "mlbfgs" or second == "mlbfgs":
        _check_mlbfgs_config(args)
    elif optimizer in ("sgd", "muon") and args.nesterov and args.momentum == 0:
        raise UsageError("--nesterov needs --momentum > 0")
    elif optimizer == "lbfgs" and args.history_size < 1:
        raise UsageError(f"--history-size must be an integer >= 1, got {args.history_size!r}")
    searching = {optimizer, second} & {"lbfgs", "mlbfgs"}
    if not searching and getattr(args, "line_search", "none") != "none":
        raise UsageError(f"--line-search {args.line_search} needs --optimizer lbfgs or "
                         f"mlbfgs (or --switch-at with --switch-to), not {optimizer}")
    tolerances = list(given_tolerances(args))
    if tolerances and not ("lbfgs" in searching or searched_mlbfgs(args)):
        raise UsageError(f"{flag(tolerances[0])} applies to L-BFGS: --optimizer lbfgs, or "
                         f"mlbfgs with --line-search (also after --switch-at)")
    _check_pinn_args(args)
    if optimizer != "mlbfgs" and getattr(args, "grad_reduce", None) == "reducescatter":
        # The baselines read every gradient on every rank: only an allreduce serves them.
        raise UsageError(f"--grad-reduce reducescatter needs --optimizer mlbfgs (the only one "
                         f"that reads just the blocks a rank owns), not {optimizer}")
    data_root = getattr(args, "data_root", None)
    if data_root is not None and not Path(data_root).is_dir():
        raise UsageError(f"--data-root {data_root}: no such directory (it must hold the "
                         f"Fashion-MNIST idx files)")
    resume = getattr(args, "resume", "auto")
    if resume not in ("auto", "never") and not Path(resume).exists():
        raise UsageError(f"--resume {resume}: no such checkpoint or run directory (allowed: "
                         f"'auto', 'never' or an existing path)")


def train_args_ok(args: argparse.Namespace, *, prog: str = "mlbfgs-train") -> bool:
    """:func:`validate_train_args`, reporting a bad value as one line from rank 0."""
    try:
        validate_train_args(args)
    except UsageError as exc:
        print_usage_error(prog, str(exc), rank=launcher_rank())
        return False
    return True


#: ``torch.optim.LBFGS``'s stopping tolerances, as flags (``--tolerance-grad``, ...).
LBFGS_TOLERANCES: tuple[str, ...] = ("tolerance_grad", "tolerance_change")


def given_tolerances(args: Any) -> dict[str, float]:
    """The :data:`LBFGS_TOLERANCES` the command line set (the others keep torch's)."""
    return {name: getattr(args, name) for name in LBFGS_TOLERANCES
            if getattr(args, name, None) is not None}


def searched_mlbfgs(args: argparse.Namespace) -> bool:
    """Whether the run's mL-BFGS (first optimizer or ``--switch-to``) uses a line search."""
    uses = (getattr(args, "optimizer", None) == "mlbfgs"
            or (getattr(args, "switch_at", None) is not None
                and getattr(args, "switch_to", None) == "mlbfgs"))
    return uses and getattr(args, "line_search", "none") != "none"


def _check_pinn_args(args: argparse.Namespace) -> None:
    """The PINN flags: only with ``--pde``, and not the classifier's model or data."""
    if getattr(args, "pde", None) is None:
        for dest in ("collocation", "boundary_points", "constraint_weight", "dtype"):
            if getattr(args, dest, None) is not None:
                raise UsageError(f"{flag(dest)} needs --pde")
        if getattr(args, "collocation_batch", 0):
            raise UsageError("--collocation-batch needs --pde (a classifier's batch is "
                             "--batch-size)")
        return
    for dest in ("model", "dataset", "data_root"):
        if getattr(args, dest, None) is not None:
            raise UsageError(f"{flag(dest)} does not apply to --pde {args.pde} (the PINN is a "
                             f"tanh MLP, see --width/--depth; its data are collocation points)")


def _check_mlbfgs_config(args: argparse.Namespace) -> None:
    """The optimizer's own validation, with its argument names turned into flags."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(MLBFGSConfig)
              if hasattr(args, f.name)}
    try:
        config = MLBFGSConfig(**{k: v for k, v in values.items() if v is not None})
        if searched_mlbfgs(args):
            check_searched_config(config)
            check_searched_group({"momentum": args.momentum,
                                  "weight_decay": getattr(args, "weight_decay", None) or 0.0})
        elif getattr(args, "momentum", None) is not None:  # a param-group setting, checked
            validate_momentum(args.momentum,               # as the optimizer does
                              nesterov=bool(values.get("nesterov")))
    except ValueError as exc:
        message = str(exc).replace("with line_search_fn", "with --line-search")
        for name in sorted([*values, "momentum", "weight_decay"], key=len, reverse=True):
            if message.startswith(name + " "):
                message = flag(name) + message[len(name):]
                break
        raise UsageError(message) from None
