"""Typed, validated hyper-parameters of mL-BFGS.

Every constant of the algorithm in ``DESIGN.md`` §1 is a field here with the design's default.
Validation happens once, at construction, and raises :class:`ValueError` naming the argument
and its allowed range, so a bad value never reaches a running (possibly multi-node) job.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from .linesearch import LINE_SEARCH_FNS

#: Default outer heavy-ball momentum μ of every param group (DESIGN.md §1.8).
DEFAULT_MOMENTUM = 0.9

ClipMode = Literal["graft", "graft-global", "kl", "none"]
CLIP_MODES: tuple[str, ...] = ("graft", "graft-global", "kl", "none")


def _require(condition: bool, name: str, allowed: str, value: object) -> None:
    if not condition:
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class MLBFGSConfig:
    """Algorithm constants shared by all param groups (``lr``, ``weight_decay`` and the outer
    ``momentum`` are per group: :func:`validate_group_hyperparameters`).

    Args:
        history_size: number m of curvature pairs kept per block (ring buffer).
        update_freq: period T, in steps, of the momentum snapshots that form pairs.
        beta_param: EMA factor βθ of the parameter momentum buffer.
        beta_grad: EMA factor βg of the gradient momentum buffer.
        damping: 1 − τ0; 0 disables damping inside [sigma_low, sigma_high].
        sigma_low: lower bound σL of the curvature ratio μ = sᵀy/sᵀs.
        sigma_high: upper bound σH of μ.
        curvature_eps: ε of the acceptance test sᵀŷ > ε·sᵀs.
        clip: how the step is sized once a block has curvature: ``"graft"`` (each block's
            H·g rescaled to the norm of that block's g: the curvature picks the direction,
            the gradient its length; Agarwal et al. 2020), ``"graft-global"`` (the whole
            direction, every block on every rank, rescaled by ONE factor to the gradient's
            norm: the blocks keep the relative lengths H gives them, as in the authors' block
            code's unit-norm direction; with ``damping=0.01`` the better choice for the
            transformer LM, BENCHMARKS.md §9.12–9.13), ``"kl"`` (the design's guard,
            ν = min(1, sqrt(κ/gᵀd)) on the whole direction) or ``"none"``.
        kl_clip: κ of the ``"kl"`` guard.
        nesterov: use Nesterov's variant of the outer momentum (every group's momentum
            must then be > 0 at construction, as for ``torch.optim.SGD``).
        pair_momentum: EMA factor over successive pairs (the authors' "double momentum"):
            the offered pair is s̄ ← p·s̄ + (1−p)·s (same for y), started at the first
            pair; 0: off.
        double_damping: μ1 of the first stage of double damping (Goldfarb, Ren and
            Bahamou 2020, "Practical quasi-Newton methods for training deep neural
            networks"): before the design's damping of y, a block that already has curvature
            moves s towards H·y, s ← θ·s + (1−θ)·H·y with θ chosen so that sᵀy ≥ μ1·yᵀHy.
            It bounds how much one noisy pair can grow H (the update's growth factor is
            ~ yᵀHy/sᵀy); 0: off. Default 0.2 (their value): at global batch 1,024 and
            4,096 H·g blew up without it (BENCHMARKS.md §9.5, §9.7), at batch 128 and on
            every task of the lr ½×/1×/2× protocol it changes nothing measurable (§9.3).
        max_grad_norm: clip the averaged gradient (before weight decay, as
            ``torch.nn.utils.clip_grad_norm_`` before a torch optimizer's step) to this global
            norm over all blocks on all ranks; ``None``: no clipping.
    """

    history_size: int = 10
    update_freq: int = 50
    beta_param: float = 0.9
    beta_grad: float = 0.9
    damping: float = 0.2
    sigma_low: float = 0.01
    sigma_high: float = 1.5
    curvature_eps: float = 1e-8
    clip: ClipMode = "graft"
    kl_clip: float = 0.005
    nesterov: bool = False
    pair_momentum: float = 0.0
    double_damping: float = 0.2
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        _require(_integer(self.history_size) and self.history_size >= 1,
                 "history_size", "an integer >= 1", self.history_size)
        _require(_integer(self.update_freq) and self.update_freq >= 1,
                 "update_freq", "an integer >= 1", self.update_freq)
        for name in ("beta_param", "beta_grad"):
            value = getattr(self, name)
            _require(_finite(value) and 0.0 <= value < 1.0, name, "in [0, 1)", value)
        _require(_finite(self.damping) and 0.0 <= self.damping < 1.0,
                 "damping", "in [0, 1)", self.damping)
        _require(_finite(self.sigma_low) and 0.0 <= self.sigma_low < 1.0,
                 "sigma_low", "in [0, 1)", self.sigma_low)
        # inf: no upper edge (the line-searched mode's default: no window at all).
        _require(_number(self.sigma_high) and self.sigma_high > 1.0,
                 "sigma_high", "a number > 1 (inf: no upper bound)", self.sigma_high)
        _require(_finite(self.curvature_eps) and self.curvature_eps >= 0.0,
                 "curvature_eps", "a finite number >= 0", self.curvature_eps)
        _require(self.clip in CLIP_MODES, "clip", f"one of {CLIP_MODES}", self.clip)
        _require(_finite(self.kl_clip) and self.kl_clip > 0.0,
                 "kl_clip", "a finite number > 0", self.kl_clip)
        _require(isinstance(self.nesterov, bool), "nesterov", "a bool", self.nesterov)
        _require(_finite(self.pair_momentum) and 0.0 <= self.pair_momentum < 1.0,
                 "pair_momentum", "in [0, 1)", self.pair_momentum)
        _require(_finite(self.double_damping) and 0.0 <= self.double_damping < 1.0,
                 "double_damping", "in [0, 1)", self.double_damping)
        _require(self.max_grad_norm is None or (_finite(self.max_grad_norm)
                                                and self.max_grad_norm > 0.0),
                 "max_grad_norm", "None or a finite number > 0", self.max_grad_norm)

    def to_dict(self) -> dict[str, object]:
        """The fields as JSON values (checkpoints store them): an infinite ``sigma_high``
        (no upper edge) is written as the string ``"inf"``."""
        return {key: (str(value) if isinstance(value, float) and math.isinf(value) else value)
                for key, value in dataclasses.asdict(self).items()}


#: Closure evaluations torch's strong-Wolfe search may spend at most (its ``max_ls``).
SEARCH_EVALS = 25


def default_max_eval(max_iter: int) -> int:
    """``max_eval`` when not given: ``torch.optim.LBFGS``'s ``max_iter · 5 // 4``, but for
    one iteration per ``step()`` the start plus one whole search (:data:`SEARCH_EVALS`)."""
    return 1 + SEARCH_EVALS if max_iter == 1 else max_iter * 5 // 4


@dataclass(frozen=True)
class LineSearchConfig:
    """How ``MLBFGS.step(closure)`` iterates when ``line_search_fn`` is set: the meaning and
    the defaults of ``torch.optim.LBFGS``'s arguments of the same names.

    Args:
        line_search_fn: ``"strong_wolfe"`` (the only search; see :mod:`mlbfgs_hpc.linesearch`).
        max_iter: L-BFGS iterations per ``step()`` (each ends with a line search). With a
            full batch, more than one saves the closure evaluation every ``step()`` starts
            with; with a fresh mini-batch per ``step()``, use 1.
        max_eval: closure evaluations per ``step()``. Default ``max_iter · 5 // 4``, torch's,
            except for ``max_iter=1``: 26, the start and torch's 25-evaluation cap of one
            search (torch's 1 leaves a one-iteration step no evaluation to search with).
        tolerance_grad: a ``step()`` stops once max|g| falls to this (first-order optimal).
        tolerance_change: it stops once the step, or the change of the loss, is below this.
    """

    line_search_fn: str = "strong_wolfe"
    max_iter: int = 20
    max_eval: int | None = None
    tolerance_grad: float = 1e-7
    tolerance_change: float = 1e-9

    def __post_init__(self) -> None:
        _require(self.line_search_fn in LINE_SEARCH_FNS, "line_search_fn",
                 f"None or one of {LINE_SEARCH_FNS}", self.line_search_fn)
        _require(_integer(self.max_iter) and self.max_iter >= 1,
                 "max_iter", "an integer >= 1", self.max_iter)
        if self.max_eval is None:
            object.__setattr__(self, "max_eval", default_max_eval(self.max_iter))
        _require(_integer(self.max_eval) and self.max_eval >= 1,
                 "max_eval", "None or an integer >= 1", self.max_eval)
        for name in ("tolerance_grad", "tolerance_change"):
            value = getattr(self, name)
            _require(_finite(value) and value >= 0.0, name, "a finite number >= 0", value)

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


#: The defaults that change when ``line_search_fn`` is set: what serves exact (full-batch or
#: low-noise) gradients, as ``torch.optim.LBFGS`` does. A pair from every iteration's step
#: (s = t·d, as torch; no EMAs, T = 1), the standard γ = sᵀy/yᵀy, no damping window, no grafting
#: (the search sizes the step), no outer momentum (the step must stay along the searched
#: direction), torch's lr 1 and history 100 (BENCHMARKS.md: PINN tasks).
SEARCHED_DEFAULTS: dict[str, object] = {
    "lr": 1.0, "history_size": 100, "update_freq": 1, "beta_param": 0.0, "beta_grad": 0.0,
    "damping": 0.0, "sigma_low": 0.0, "sigma_high": math.inf, "double_damping": 0.0,
    "clip": "none", "momentum": 0.0,
}
def validate_group_hyperparameters(*, lr: float, weight_decay: float, momentum: float,
                                   nesterov: bool = False) -> None:
    """Check one param group's hyper-parameters (the constructor's defaults and every group).

    ``momentum`` is the outer heavy-ball momentum μ, per group as in ``torch.optim.SGD`` (so
    ``OneCycleLR``/``CyclicLR`` can cycle it); ``nesterov``: the optimizer's setting, which
    needs μ > 0.
    """
    _require(_finite(lr) and lr >= 0.0, "lr", "a finite number >= 0", lr)
    _require(_finite(weight_decay) and weight_decay >= 0.0,
             "weight_decay", "a finite number >= 0", weight_decay)
    validate_momentum(momentum, nesterov=nesterov)


def validate_momentum(momentum: float, *, nesterov: bool) -> None:
    """Check a group's outer momentum μ in [0, 1), and μ > 0 when ``nesterov``."""
    _require(_finite(momentum) and 0.0 <= momentum < 1.0, "momentum", "in [0, 1)", momentum)
    _require(not (nesterov and momentum == 0.0),
             "nesterov", "False when momentum == 0 (Nesterov needs momentum > 0)", nesterov)


def _integer(value: object) -> bool:
    # bool is a subclass of int, but history_size=True is a mistake, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> bool:
    """A real number, possibly infinite, not NaN (not a bool)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and not math.isnan(value))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The defaults without a line search (the stochastic regime): the constructor's.
STOCHASTIC_DEFAULTS: dict[str, object] = {
    "lr": 0.1, "momentum": DEFAULT_MOMENTUM,
    **{key: getattr(MLBFGSConfig(), key) for key in SEARCHED_DEFAULTS
       if key not in ("lr", "momentum")}}


def line_search_settings(*, line_search_fn: str | None, max_iter: int | None = None,
                         max_eval: int | None = None, tolerance_grad: float | None = None,
                         tolerance_change: float | None = None) -> LineSearchConfig | None:
    """The constructor's line-search arguments as a :class:`LineSearchConfig` (``None``
    without a line search).

    Raises:
        ValueError: an iteration argument given without ``line_search_fn`` (the stochastic
            step takes one iteration per ``step()`` and has no tolerances), or out of range.
    """
    given = {"max_iter": max_iter, "max_eval": max_eval, "tolerance_grad": tolerance_grad,
             "tolerance_change": tolerance_change}
    set_args = {k: v for k, v in given.items() if v is not None}
    if line_search_fn is None:
        if set_args:
            raise ValueError(f"{', '.join(set_args)} only apply with line_search_fn "
                             f"(e.g. line_search_fn='strong_wolfe')")
        return None
    return LineSearchConfig(line_search_fn=line_search_fn, **set_args)  # type: ignore[arg-type]


def mode_defaults(given: dict[str, object], *, searched: bool) -> dict[str, Any]:
    """``given`` with every ``None`` replaced by the default of the mode
    (:data:`SEARCHED_DEFAULTS` with a line search, :data:`STOCHASTIC_DEFAULTS` without)."""
    defaults = SEARCHED_DEFAULTS if searched else STOCHASTIC_DEFAULTS
    return {key: defaults[key] if value is None else value for key, value in given.items()}


def check_searched_config(config: MLBFGSConfig) -> None:
    """Refuse the options that have no meaning when a line search sizes the step.

    Raises:
        ValueError: grafting or the KL guard (``clip`` other than ``"none"``: the search sets
            the length), double damping or pair smoothing (not implemented for the full
            history of the searched mode), Nesterov, or ``max_grad_norm`` (a clipped gradient
            is not the gradient of the loss the search measures).
    """
    _require(config.clip == "none", "clip", "'none' with line_search_fn (the line search "
             "sizes the step)", config.clip)
    _require(config.double_damping == 0.0, "double_damping", "0 with line_search_fn",
             config.double_damping)
    _require(config.pair_momentum == 0.0, "pair_momentum", "0 with line_search_fn",
             config.pair_momentum)
    _require(not config.nesterov, "nesterov", "False with line_search_fn", config.nesterov)
    _require(config.max_grad_norm is None, "max_grad_norm",
             "None with line_search_fn (the search needs the loss's own gradient)",
             config.max_grad_norm)


def check_searched_group(group: dict[str, Any]) -> None:
    """One param group's values with a line search: no outer momentum (the step must stay on
    the searched direction) and no weight decay (put the penalty into the closure's loss,
    which is what the search measures).

    Raises:
        ValueError: ``momentum`` or ``weight_decay`` other than 0.
    """
    _require(group["momentum"] == 0.0, "momentum", "0 with line_search_fn (the step must "
             "stay on the searched direction)", group["momentum"])
    _require(group["weight_decay"] == 0.0, "weight_decay", "0 with line_search_fn (add the "
             "penalty to the closure's loss instead)", group["weight_decay"])
