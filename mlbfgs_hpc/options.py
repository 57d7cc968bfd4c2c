"""The flags of ``mlbfgs-train``: one argparse parser, its choices and per-optimizer lrs.

Every mL-BFGS hyper-parameter flag takes its default from
:class:`~mlbfgs_hpc.config.MLBFGSConfig`, so the command and the library cannot drift apart;
the values are checked by :mod:`mlbfgs_hpc.cli` before anything starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from . import cli
from .baselines import ADAMW_WEIGHT_DECAY, MUON_MOMENTUM, MUON_NESTEROV
from .comm import GRAD_BACKENDS, GRAD_REDUCE_MODES
from .config import (CLIP_MODES, DEFAULT_MOMENTUM, SEARCH_EVALS, SEARCHED_DEFAULTS, MLBFGSConfig,
                     STOCHASTIC_DEFAULTS, default_max_eval)
from .data import DATASET_NAMES
from .models import MODEL_NAMES
from .cli import searched_mlbfgs
from .pinn import PROBLEMS

OPTIMIZERS = ("mlbfgs", "sgd", "adam", "adamw", "lbfgs", "muon")
#: ``--switch-to`` choices: the second optimizer of the PINN recipe (Adam, then L-BFGS).
SWITCH_TARGETS = ("lbfgs", "mlbfgs")
#: ``--line-search`` choices (``lbfgs`` and ``mlbfgs``): torch's ``line_search_fn``.
LINE_SEARCHES = ("none", "strong_wolfe")
#: Closure evaluations one ``--line-search`` may spend in a step after the step's first
#: (torch's own cap on a strong-Wolfe search, ``max_ls``).
LINE_SEARCH_EVALS = SEARCH_EVALS
SCHEDULES = ("none", "cosine", "step")
#: ``muon``: Muon's lr on the hidden layers' matrices (torch's documented example); its AdamW
#: half takes ``--muon-adamw-lr`` (default: AdamW's, torch's default).
DEFAULT_LR = {"mlbfgs": 0.1, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "lbfgs": 0.1,
              "muon": 0.02}
DEFAULT_EPOCHS = 2.0
#: A PINN run's length when neither ``--steps`` nor ``--epochs`` is given.
PINN_DEFAULT_STEPS = 1000
#: The lr with ``--line-search`` (the search's first trial step): torch's and MLBFGS's 1.
SEARCHED_LR = 1.0
NODE_AWARE_CHOICES = {"auto": None, "on": True, "off": False}
#: The lr warm-up when ``--warmup-steps`` is not given, as a fraction of the run's steps: with
#: it the small CNN survives 2x its recommended lr (BENCHMARKS.md §9.9; without it, seeds
#: 1 and 2 died at step 30-40 at lr 0.2, before any curvature pair).
DEFAULT_WARMUP_FRACTION = 0.1


def resolve_optimizer_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags whose default depends on ``--optimizer`` (left ``None`` by the parser)
    with that optimizer's default, in place; the trainer records the values it ran with.

    ``--momentum``: 0.9 (:data:`~mlbfgs_hpc.config.DEFAULT_MOMENTUM`), muon 0.95;
    ``--nesterov``: off, muon on (with a momentum); ``--weight-decay``: 0, adamw 0.01, muon ``None`` (torch's
    default of each half: 0.1 on Muon's matrices, 0.01 on the AdamW half); muon's
    ``--muon-adamw-lr``: AdamW's default lr. torch's own defaults, for muon and adamw.
    """
    muon = args.optimizer == "muon"
    if getattr(args, "momentum", 0.0) is None:
        args.momentum = MUON_MOMENTUM if muon else DEFAULT_MOMENTUM
    if getattr(args, "nesterov", False) is None:  # Nesterov needs momentum: --momentum 0 drops it
        args.nesterov = MUON_NESTEROV and args.momentum > 0 if muon else False
    if getattr(args, "weight_decay", 0.0) is None and not muon:
        args.weight_decay = ADAMW_WEIGHT_DECAY if args.optimizer == "adamw" else 0.0
    if muon and getattr(args, "muon_adamw_lr", 0.0) is None:
        args.muon_adamw_lr = DEFAULT_LR["adamw"]
    return args


def default_warmup_steps(total_steps: int) -> int:
    """The warm-up steps of a ``total_steps``-step run when ``--warmup-steps`` is not given:
    :data:`DEFAULT_WARMUP_FRACTION` of the run, rounded (0 for runs under 5 steps)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    # Half up, not Python's round-half-even: 15 steps -> 2, 25 -> 3. Always below the run's
    # length, as the scheduler requires (0.1·n + 0.5 < n for every n >= 1).
    return math.floor(DEFAULT_WARMUP_FRACTION * total_steps + 0.5)


_DEFAULTS = MLBFGSConfig()


def lbfgs_search_settings(line_search: str, *, max_iter: int = 1,
                          tolerance_grad: float | None = None,
                          tolerance_change: float | None = None) -> dict[str, Any]:
    """The ``torch.optim.LBFGS`` param-group entries of ``--line-search`` for ``max_iter``
    iterations per step (and the tolerances, where given).

    ``max_eval`` is torch's default (``max_iter · 5 // 4``), except for a search with one
    iteration per step (the classification trainer's), where torch's 1 would leave the search
    no evaluation after the step's first: it then gets :data:`LINE_SEARCH_EVALS` more (as
    :class:`~mlbfgs_hpc.MLBFGS` does, :func:`~mlbfgs_hpc.config.default_max_eval`).
    """
    tolerances = {name: value for name, value in (("tolerance_grad", tolerance_grad),
                                                  ("tolerance_change", tolerance_change))
                  if value is not None}
    if line_search == "none":
        return {"line_search_fn": None, "max_eval": max_iter * 5 // 4, **tolerances}
    return {"line_search_fn": line_search, "max_eval": default_max_eval(max_iter),
            **tolerances}


#: The mL-BFGS flags whose default depends on the mode (with or without ``--line-search``):
#: :data:`~mlbfgs_hpc.config.STOCHASTIC_DEFAULTS` / :data:`~mlbfgs_hpc.config.SEARCHED_DEFAULTS`.
MODE_FLAGS: tuple[str, ...] = ("history_size", "update_freq", "beta_param", "beta_grad",
                               "damping", "sigma_low", "sigma_high", "clip", "double_damping")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on other flags (in place; returned for chaining).

    * classification or PINN (``--pde``): ``--model``/``--dataset`` (cnn on Fashion-MNIST),
      ``--schedule`` (cosine; none for a PINN), ``--max-iter`` (20 for a full-batch PINN,
      torch's default; else 1: one iteration per batch);
    * mL-BFGS with or without ``--line-search``: the hyper-parameters of :data:`MODE_FLAGS`,
      ``--momentum`` and the lr (:data:`SEARCHED_LR` with a search);
    * the lr of the first optimizer (:data:`DEFAULT_LR`).

    Resolved here, once, the values are what a checkpoint records, so a run resumed with the
    same command line sees no changed setting.
    """
    pinn = getattr(args, "pde", None) is not None
    if not pinn:
        args.model = "cnn" if args.model is None else args.model
        args.dataset = "fashion-mnist" if args.dataset is None else args.dataset
    if not pinn and args.epochs is None:
        args.epochs = DEFAULT_EPOCHS
    if pinn and args.epochs is None and args.steps is None:
        args.steps = PINN_DEFAULT_STEPS
    if args.log_every is None:
        args.log_every = 1 if pinn else 10
    if args.schedule is None:
        args.schedule = "none" if pinn else "cosine"
    if args.max_iter is None:
        args.max_iter = 20 if pinn and not args.collocation_batch else 1
    defaults = SEARCHED_DEFAULTS if searched_mlbfgs(args) else STOCHASTIC_DEFAULTS
    for key in MODE_FLAGS:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    if args.momentum is None:   # (0 also for an SGD phase before a searched mL-BFGS)
        args.momentum = MUON_MOMENTUM if args.optimizer == "muon" else defaults["momentum"]
    resolve_optimizer_defaults(args)
    if args.lr is None:
        searched = args.line_search != "none" and args.optimizer in ("mlbfgs", "lbfgs")
        args.lr = SEARCHED_LR if searched else DEFAULT_LR[args.optimizer]
    return args


class TrainArgumentParser(cli.ArgumentParser):
    """``mlbfgs-train``'s parser: after parsing, :func:`resolve_defaults`."""

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None
                         ) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        return resolve_defaults(parsed), rest


def _mode_help(key: str) -> str:
    return (f"default {STOCHASTIC_DEFAULTS[key]}, with --line-search "
            f"{SEARCHED_DEFAULTS[key]}").replace("%", "%%")


def _add_pinn_arguments(p: argparse.ArgumentParser) -> None:
    pinn = p.add_argument_group(
        "physics-informed networks (--pde)",
        "A tanh MLP trained on the residual of a PDE at collocation points drawn from --seed "
        "and split over the ranks; the relative L2 error against the task's reference "
        "solution is logged as rel_l2 (eval records, the progress bar, mlbfgs-plot).")
    pinn.add_argument("--pde", choices=sorted(PROBLEMS), default=None,
                      help="train a PINN on this task instead of a classifier")
    pinn.add_argument("--collocation", type=int, default=None,
                      help="interior (PDE residual) points (default: the task's)")
    pinn.add_argument("--boundary-points", type=int, default=None,
                      help="boundary/initial condition points (default: the task's)")
    pinn.add_argument("--collocation-batch", type=int, default=0,
                      help="a fresh random subset of this many interior points every step "
                           "(boundary points in proportion); 0: every point, every step "
                           "(full batch)")
    pinn.add_argument("--constraint-weight", type=float, default=None,
                      help="weight of the boundary/initial term of the loss (default: the "
                           "task's)")
    pinn.add_argument("--dtype", choices=("float32", "float64"), default=None,
                      help="precision of the network, the points and the optimizer's state "
                           "(default: float32). float64 has no float32 floor, where the "
                           "loss's rounding hides every decrease and L-BFGS stops for good "
                           "(docs/pinn.md), at 1.7-2x the time per closure on a CPU core")
    switch = p.add_argument_group(
        "switching optimizers (the PINN recipe: Adam, then L-BFGS)",
        "Steps [0, --switch-at) use --optimizer, the rest --switch-to (fresh state, constant "
        "lr --switch-lr, --line-search and --max-iter apply). A checkpoint holds the "
        "optimizer of the next step, so a run resumes across the switch bit for bit.")
    switch.add_argument("--switch-at", type=int, default=None,
                        help="the step at which --switch-to takes over (default: never)")
    switch.add_argument("--switch-to", choices=SWITCH_TARGETS, default="lbfgs",
                        help="the optimizer after --switch-at")
    switch.add_argument("--switch-lr", type=float, default=SEARCHED_LR,
                        help="lr of --switch-to (with --line-search its first trial step)")


def build_parser() -> argparse.ArgumentParser:
    p = TrainArgumentParser(
        prog="mlbfgs-train", formatter_class=cli.HelpFormatter,
        description="Train a model with mL-BFGS (or a baseline) on one process or many MPI "
                    "ranks. With no arguments: a short Fashion-MNIST run of the small CNN; "
                    "with --pde: a physics-informed network (PINN).")
    a = p.add_argument
    a("--model", choices=MODEL_NAMES, default=None, help="default: cnn (not with --pde)")
    a("--dataset", choices=DATASET_NAMES, default=None,
      help="default: fashion-mnist; python-stdlib (next-character prediction) goes with "
           "--model transformer (not with --pde)")
    a("--data-root", default=None, help="directory of the Fashion-MNIST idx.gz files "
      "(python-stdlib: of the *.py files; default this Python's standard library)")
    a("--width", type=int, default=None,
      help="model width: resnet18 base channels (default 64), transformer d_model (64), the "
           "PINN's neurons per layer (default: the task's)")
    a("--depth", type=int, default=None,
      help="transformer layers (default 4), the PINN's hidden layers (default: the task's)")
    a("--optimizer", choices=OPTIMIZERS, default="mlbfgs")
    a("--epochs", type=float, default=None,
      help="length of the run in epochs (default 2; a PINN: --steps 1000)")
    a("--steps", type=int, default=None, help="length in optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=128, help="GLOBAL batch size, over all ranks")
    a("--lr", type=float, default=None,
      help=f"learning rate (default per optimizer: {DEFAULT_LR}; {SEARCHED_LR} for lbfgs "
           f"and mlbfgs with --line-search, where it is the first trial step; muon: of the "
           f"hidden layers' matrices, see --muon-adamw-lr)")
    a("--schedule", choices=SCHEDULES, default=None,
      help="default: cosine; none for --pde")
    a("--step-size", type=int, default=None,
      help="'step' schedule: steps between decays (default: a third of the run)")
    a("--gamma", type=float, default=0.1, help="'step' schedule: decay factor")
    a("--warmup-steps", type=int, default=None,
      help="linear lr warm-up over this many steps before the schedule (default: 10 %% of "
           "the run's steps; 0: none)")
    a("--weight-decay", type=float, default=None,
      help="weight decay (default: 0; adamw 0.01; muon torch's per half: 0.1 on Muon's "
           "matrices, 0.01 on its AdamW half; a value given applies to both halves)")
    a("--momentum", type=float, default=None,
      help=f"outer momentum of mlbfgs, momentum of sgd and muon (a param-group setting; "
           f"default {DEFAULT_MOMENTUM}, muon {MUON_MOMENTUM}, 0 for mlbfgs with "
           f"--line-search)")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None,
      help="Nesterov momentum (mlbfgs, sgd, muon; default: off, muon on)")
    a("--muon-adamw-lr", type=float, default=None,
      help="--optimizer muon only: lr of the parameters Muon does not take (embeddings, "
           "biases, norms, convolution filters, the output layer), which AdamW trains "
           f"(default {DEFAULT_LR['adamw']}); --lr is Muon's")
    a("--history-size", type=int, default=None, help=_mode_help("history_size"))
    a("--line-search", choices=LINE_SEARCHES, default="none",
      help="lbfgs and mlbfgs (and --switch-to): 'strong_wolfe' searches each iteration's "
           "step length along the L-BFGS direction (several forward/backward passes per "
           "step, the same on every rank: the loss is averaged over the ranks); for "
           "full-batch training (PINNs); lr 1 by default. With mlbfgs it also changes the "
           "mL-BFGS defaults to those for exact gradients (see --history-size ...). "
           "'none': a fixed step of length lr")
    a("--max-iter", type=int, default=None,
      help="L-BFGS iterations per step of lbfgs, and of mlbfgs with --line-search (torch's "
           "max_iter; default 20 for a full-batch PINN, else 1)")
    a("--tolerance-grad", type=float, default=None,
      help="L-BFGS (lbfgs, and mlbfgs with --line-search): a step() stops once max|g| is at "
           "most this (torch's tolerance_grad; default 1e-7)")
    a("--tolerance-change", type=float, default=None,
      help="L-BFGS: a step() stops once gᵀd, the step or the change of the loss is below "
           "this (torch's tolerance_change; default 1e-9, an absolute scale that stops a "
           "PINN near a loss of 1e-5; DeepXDE passes 0)")
    a("--update-freq", type=int, default=None, help=_mode_help("update_freq"))
    a("--beta-param", type=float, default=None, help=_mode_help("beta_param"))
    a("--beta-grad", type=float, default=None, help=_mode_help("beta_grad"))
    a("--damping", type=float, default=None, help=_mode_help("damping"))
    a("--sigma-low", type=float, default=None, help=_mode_help("sigma_low"))
    a("--sigma-high", type=float, default=None, help=_mode_help("sigma_high"))
    a("--curvature-eps", type=float, default=_DEFAULTS.curvature_eps)
    a("--clip", choices=CLIP_MODES, default=None,
      help="step sizing once curvature is in use: graft (per block, H·g at the norm of g), "
           "graft-global (the whole direction at the whole gradient's norm, one factor; "
           "with --damping 0.01 the better choice for transformers), "
           "kl (the design's KL guard, --kl-clip), none; " + _mode_help("clip"))
    a("--kl-clip", type=float, default=_DEFAULTS.kl_clip)
    a("--pair-momentum", type=float, default=_DEFAULTS.pair_momentum,
      help="EMA over successive curvature pairs (the authors' double momentum); 0: off")
    a("--double-damping", type=float, default=None,
      help="mu1 of double damping's first stage (s towards H*y so that s'y >= mu1*y'Hy; "
           "Goldfarb et al. 2020): bounds H's growth from noisy pairs; 0: off; "
           + _mode_help("double_damping"))
    a("--max-grad-norm", type=float, default=None,
      help="clip the averaged gradient to this global norm before each step, for every "
           "optimizer (default: no clipping); its norm is logged as grad_norm")
    a("--block-size", type=int, default=None,
      help="parameters per curvature block (default: one layer per block)")
    a("--seed", type=int, default=0)
    a("--run-dir", default="runs/default", help="metrics.jsonl and checkpoints/ go here")
    a("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (0: off)")
    a("--checkpoint-minutes", type=float, default=0.0,
      help="checkpoint every M minutes of wall-clock (0: off)")
    a("--keep", type=int, default=3, help="keep the newest K checkpoints")
    a("--stop-after", type=float, default=0.0,
      help="checkpoint and exit with 99 once this many seconds of this process have passed "
           "(0: off); for schedulers whose warning signal cannot reach the ranks")
    a("--step-sleep", type=float, default=0.0,
      help="sleep this long after every step: rehearse a job script's signal/requeue cycle "
           "with a small model (does not change the mathematics)")
    a("--resume", default="auto",
      help="'auto' (newest valid checkpoint in the run dir, if any), 'never', or a path")
    a("--grad-backend", choices=GRAD_BACKENDS, default="auto",
      help="how gradients are averaged across ranks: 'auto' (Horovod where it imports on "
           "every rank, mpi4py otherwise; the choice is logged), 'horovod' or 'mpi'")
    a("--grad-reduce", choices=GRAD_REDUCE_MODES, default="allreduce",
      help="'allreduce' (every rank receives the whole average; launched during the "
           "backward pass; measured faster, BENCHMARKS.md) or, mlbfgs only, "
           "'reducescatter' (each rank receives only the blocks it owns: about half the "
           "bytes on the network)")
    a("--node-aware", choices=NODE_AWARE_CHOICES, default="auto",
      help="combine inside each host first so one copy per host crosses the network "
           "(gradient reduce-scatter and update Allgatherv); 'auto': when a host runs "
           "more than one rank of a multi-host job")
    a("--log-every", type=int, default=None,
      help="metrics.jsonl line every N steps (default 10; 1 for --pde)")
    a("--eval-every", type=int, default=0, help="test-set evaluation every N steps "
                                                "(0: at the end of every epoch)")
    a("--synthetic-size", type=int, default=2048)
    a("--device", default="auto",
      help="'auto' (this rank's GPU when CUDA is available, else the CPU), 'cpu', 'cuda' "
           "(GPU number local rank modulo the GPUs this host has) or 'cuda:N'")
    a("--threads", type=int, default=None,
      help="torch intra-op threads per rank (default: cores / ranks on this host)")
    a("--quiet", action="store_true", help="no progress bar")
    _add_pinn_arguments(p)
    return p
