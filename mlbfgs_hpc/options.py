"""The flags of ``mlbfgs-train``: one argparse parser, its choices and per-optimizer lrs.

Every mL-BFGS hyper-parameter flag takes its default from
:class:`~mlbfgs_hpc.config.MLBFGSConfig`, so the command and the library cannot drift apart;
the values are checked by :mod:`mlbfgs_hpc.cli` before anything starts.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from . import cli
from .baselines import ADAMW_WEIGHT_DECAY, MUON_MOMENTUM, MUON_NESTEROV
from .comm import GRAD_BACKENDS, GRAD_REDUCE_MODES
from .config import CLIP_MODES, DEFAULT_MOMENTUM, MLBFGSConfig
from .data import DATASET_NAMES
from .models import MODEL_NAMES

OPTIMIZERS = ("mlbfgs", "sgd", "adam", "adamw", "lbfgs", "muon")
#: ``--line-search`` choices (``--optimizer lbfgs`` only): torch's ``line_search_fn``.
LINE_SEARCHES = ("none", "strong_wolfe")
#: Closure evaluations one ``--line-search`` may spend in a step after the step's first
#: (torch's own cap on a strong-Wolfe search, ``max_ls``).
LINE_SEARCH_EVALS = 25
SCHEDULES = ("none", "cosine", "step")
#: ``muon``: Muon's lr on the hidden layers' matrices (torch's documented example); its AdamW
#: half takes ``--muon-adamw-lr`` (default: AdamW's, torch's default).
DEFAULT_LR = {"mlbfgs": 0.1, "sgd": 0.05, "adam": 1e-3, "adamw": 1e-3, "lbfgs": 0.1,
              "muon": 0.02}
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


def lbfgs_search_settings(line_search: str) -> dict[str, Any]:
    """The ``torch.optim.LBFGS`` param-group entries of ``--line-search``.

    The trainer runs one L-BFGS iteration per batch (``max_iter=1``). torch's default
    ``max_eval`` for that is 1, which leaves a search no evaluation after the step's first: it
    could try only ``lr`` and returns a step of 0 when that fails, so a search gets
    :data:`LINE_SEARCH_EVALS` more.
    """
    if line_search == "none":
        return {"line_search_fn": None, "max_eval": 1}
    return {"line_search_fn": line_search, "max_eval": 1 + LINE_SEARCH_EVALS}


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="mlbfgs-train", formatter_class=cli.HelpFormatter,
        description="Train a model with mL-BFGS (or a baseline) on one process or many MPI "
                    "ranks. With no arguments: a short Fashion-MNIST run of the small CNN.")
    a = p.add_argument
    a("--model", choices=MODEL_NAMES, default="cnn")
    a("--dataset", choices=DATASET_NAMES, default="fashion-mnist",
      help="python-stdlib (next-character prediction) goes with --model transformer")
    a("--data-root", default=None, help="directory of the Fashion-MNIST idx.gz files "
      "(python-stdlib: of the *.py files; default this Python's standard library)")
    a("--width", type=int, default=None,
      help="model width: resnet18 base channels (default 64), transformer d_model (64)")
    a("--depth", type=int, default=None, help="transformer layers (default 4)")
    a("--optimizer", choices=OPTIMIZERS, default="mlbfgs")
    a("--epochs", type=float, default=2.0, help="length of the run in epochs")
    a("--steps", type=int, default=None, help="length in optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, default=128, help="GLOBAL batch size, over all ranks")
    a("--lr", type=float, default=None,
      help=f"learning rate (default per optimizer: {DEFAULT_LR}; muon: of the hidden "
           "layers' matrices, see --muon-adamw-lr)")
    a("--schedule", choices=SCHEDULES, default="cosine")
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
           f"default {DEFAULT_MOMENTUM}, muon {MUON_MOMENTUM})")
    a("--nesterov", action=argparse.BooleanOptionalAction, default=None,
      help="Nesterov momentum (mlbfgs, sgd, muon; default: off, muon on)")
    a("--muon-adamw-lr", type=float, default=None,
      help="--optimizer muon only: lr of the parameters Muon does not take (embeddings, "
           "biases, norms, convolution filters, the output layer), which AdamW trains "
           f"(default {DEFAULT_LR['adamw']}); --lr is Muon's")
    a("--history-size", type=int, default=_DEFAULTS.history_size)
    a("--line-search", choices=LINE_SEARCHES, default="none",
      help="--optimizer lbfgs only: 'strong_wolfe' searches each step's length along the "
           "L-BFGS direction (torch's line search; several forward/backward passes per "
           "step, the same on every rank); for full-batch training, with --lr 1. 'none': "
           "a fixed step of length lr")
    a("--update-freq", type=int, default=_DEFAULTS.update_freq)
    a("--beta-param", type=float, default=_DEFAULTS.beta_param)
    a("--beta-grad", type=float, default=_DEFAULTS.beta_grad)
    a("--damping", type=float, default=_DEFAULTS.damping)
    a("--sigma-low", type=float, default=_DEFAULTS.sigma_low)
    a("--sigma-high", type=float, default=_DEFAULTS.sigma_high)
    a("--curvature-eps", type=float, default=_DEFAULTS.curvature_eps)
    a("--clip", choices=CLIP_MODES, default=_DEFAULTS.clip,
      help="step sizing once curvature is in use: graft (per block, H·g at the norm of g), "
           "graft-global (the whole direction at the whole gradient's norm, one factor; "
           "with --damping 0.01 the better choice for transformers), "
           "kl (the design's KL guard, --kl-clip), none")
    a("--kl-clip", type=float, default=_DEFAULTS.kl_clip)
    a("--pair-momentum", type=float, default=_DEFAULTS.pair_momentum,
      help="EMA over successive curvature pairs (the authors' double momentum); 0: off")
    a("--double-damping", type=float, default=_DEFAULTS.double_damping,
      help="mu1 of double damping's first stage (s towards H*y so that s'y >= mu1*y'Hy; "
           "Goldfarb et al. 2020): bounds H's growth from noisy pairs; 0: off "
           "(default %(default)s)")
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
    a("--log-every", type=int, default=10, help="metrics.jsonl line every N steps")
    a("--eval-every", type=int, default=0, help="test-set evaluation every N steps "
                                                "(0: at the end of every epoch)")
    a("--synthetic-size", type=int, default=2048)
    a("--device", default="auto",
      help="'auto' (this rank's GPU when CUDA is available, else the CPU), 'cpu', 'cuda' "
           "(GPU number local rank modulo the GPUs this host has) or 'cuda:N'")
    a("--threads", type=int, default=None,
      help="torch intra-op threads per rank (default: cores / ranks on this host)")
    a("--quiet", action="store_true", help="no progress bar")
    return p
