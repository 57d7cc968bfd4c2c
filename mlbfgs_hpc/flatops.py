"""Elementwise pieces of the step on a rank's flat buffers, free of ranks and param groups.

* :func:`all_finite`: the non-finite gradient test, without a temporary on the usual path.
* :func:`gradient_row` / :func:`clip_factor`: what a rank contributes to the step's first
  allgather (its non-finite flag and, when clipping, ‖g_owned‖²) and the clip factor from the
  rank-order totals, identical on every rank::

      rank r:  [bad_r, ‖g_r‖²]  ──allgather──►  Σ in rank order  ──►  skip, or g ← g·factor

* :func:`heavy_ball_`: the outer momentum on one run of elements (``torch.optim.SGD``'s rule).
* :func:`zero_spans_` / :func:`held_spans`: leave some runs of elements out of a whole-buffer
  operation (the parameters that sit a step out, :mod:`mlbfgs_hpc.participation`) without
  giving up the whole-buffer operation itself; nothing is done for an empty list.
* :func:`weight_decay_`, :func:`update_emas_`, :func:`outer_momentum_`: the step's
  elementwise stages on the owned slice, per run of one param group (``Segment``s, whose
  ``group`` indexes the per-group values passed in).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch

#: Added to the norm in the clip factor, as ``torch.nn.utils.clip_grad_norm_`` does.
CLIP_EPS = 1e-6


def all_finite(flat: torch.Tensor, total: float | None = None) -> bool:
    """Whether every entry is finite, without an O(n) temporary on the usual path.

    A NaN or ±Inf entry always makes the sum non-finite, so a finite sum proves the vector
    finite. ``torch.isfinite`` allocates ~7 bytes per element (abs, eq, ne, mul temporaries,
    measured with torch.profiler); it now runs only when the sum is non-finite, which also
    covers a sum that overflowed on finite entries. ``total``: the sum (or ‖flat‖²) when
    already read back.
    """
    if math.isfinite(float(flat.sum()) if total is None else total):
        return True
    return bool(torch.isfinite(flat).all())


def gradient_row(flat: torch.Tensor, *, measure_norm: bool,
                 params: torch.Tensor | None = None) -> list[float]:
    """This rank's row of the step's first allgather: ``[1.0 if a non-finite entry else 0.0]``
    and, with ``measure_norm``, ``‖flat‖²`` (whose finiteness then proves the entries finite;
    an overflowed one is checked entry by entry); with ``params``, a last entry flagging a
    non-finite parameter the same way. ONE read-back from the device for all of them (a
    GPU synchronises once)."""
    first = torch.dot(flat, flat) if measure_norm else flat.sum()
    sums = [first] if params is None else [first, params.sum()]
    values = torch.stack(sums).tolist()
    row = [0.0 if all_finite(flat, values[0]) else 1.0]
    if measure_norm:
        row.append(values[0])
    if params is not None:
        row.append(0.0 if all_finite(params, values[1]) else 1.0)
    return row


def clip_factor(grad_sq: float, max_norm: float) -> float:
    """The factor ``clip_grad_norm_`` applies for a gradient of squared norm ``grad_sq``:
    ``max_norm / (‖g‖ + 1e-6)`` when below 1, else 1 (an overflowed norm gives 0)."""
    return min(1.0, max_norm / (math.sqrt(grad_sq) + CLIP_EPS))


def heavy_ball_(buf: torch.Tensor, direction: torch.Tensor, momentum: float, *,
                nesterov: bool, first: bool) -> torch.Tensor:
    """``buf ← μ·buf + d`` (``buf ← d`` at the first step) and the step vector: ``buf``, or
    ``d + μ·buf`` with Nesterov (written into ``direction``).

    As ``torch.optim.SGD``: μ = 0 returns ``direction`` and leaves ``buf`` alone, and a buffer
    never written is zero, so its first μ > 0 step starts it at ``d`` exactly (0·μ + d = d).
    """
    if momentum == 0.0:
        return direction
    if first:
        buf.copy_(direction)
    else:
        buf.mul_(momentum).add_(direction)
    return direction.add_(buf, alpha=momentum) if nesterov else buf


class Span(Protocol):
    """A run ``[start, stop)`` of a flat buffer (e.g. :class:`~mlbfgs_hpc.layout.ParamSpan`)."""

    @property
    def start(self) -> int: ...

    @property
    def stop(self) -> int: ...


def zero_spans_(flat: torch.Tensor, spans: Sequence[Span]) -> None:
    """Set the elements of ``flat`` in ``spans`` to zero."""
    for span in spans:
        flat[span.start:span.stop].zero_()


@contextmanager
def held_spans(buffers: Sequence[torch.Tensor], spans: Sequence[Span]) -> Iterator[None]:
    """Whatever the body does to ``buffers``, their elements in ``spans`` keep the values
    they had before it (copied aside and put back; nothing is copied for no spans)."""
    saved = [[buf[sp.start:sp.stop].clone() for sp in spans] for buf in buffers] if spans else []
    yield
    for buf, values in zip(buffers, saved):
        for sp, value in zip(spans, values):
            buf[sp.start:sp.stop].copy_(value)


class GroupRun(Span, Protocol):
    """A :class:`Span` of one param group (:class:`~mlbfgs_hpc.layout.Segment`)."""

    @property
    def group(self) -> int: ...


def weight_decay_(grad: torch.Tensor, param: torch.Tensor, runs: Sequence[GroupRun],
                  decays: Sequence[float], *, held: Sequence[Span] = ()) -> None:
    """``g ← g + wd·θ`` with each run's group's ``wd``; ``held`` runs end with g = 0 (no
    gradient, no decay)."""
    for run in runs:
        wd = decays[run.group]
        if wd:
            grad[run.start:run.stop].add_(param[run.start:run.stop], alpha=wd)
    zero_spans_(grad, held)


def update_emas_(state: Mapping[str, torch.Tensor], *, param: torch.Tensor, grad: torch.Tensor,
                 beta_param: float, beta_grad: float, first: bool, held: Sequence[Span] = (),
                 starting: Sequence[Span] = ()) -> None:
    """The EMAs ``m_param``/``m_grad`` of ``state`` take this step's θ and g: started at
    them at the run's ``first`` step, ``lerp``ed after. ``held`` runs keep their values
    (never fed a fake zero gradient); ``starting`` runs (a parameter's first gradient after
    the first step) start at θ and g, with their snapshots, so the next pair measures only
    what they did from now on."""
    m_param, m_grad = state["m_param"], state["m_grad"]
    with held_spans((m_param, m_grad), held):
        if first:  # normalised EMAs start at the first value (no bias correction)
            m_param.copy_(param)
            m_grad.copy_(grad)
        else:
            m_param.lerp_(param, 1.0 - beta_param)
            m_grad.lerp_(grad, 1.0 - beta_grad)
    for span in starting:
        sl = slice(span.start, span.stop)
        for key, source in (("m_param", param), ("snap_param", param), ("m_grad", grad),
                            ("snap_grad", grad)):
            state[key][sl].copy_(source[sl])


def outer_momentum_(buf: torch.Tensor, direction: torch.Tensor, out: torch.Tensor,
                    runs: Sequence[GroupRun], *, momenta: Sequence[float],
                    lrs: Sequence[float], nesterov: bool, first: bool,
                    held: Sequence[Span] = ()) -> None:
    """Heavy-ball momentum (:func:`heavy_ball_`) and ``out ← lr·step vector`` with each
    run's group's μ and lr; ``held`` runs keep their buffer and get ``out = 0``."""
    with held_spans((buf,), held):
        if len(set(momenta)) == 1:   # the usual case: one μ, whole-slice ops
            whole = heavy_ball_(buf, direction, momenta[0], nesterov=nesterov, first=first)
            parts = [(run, whole[run.start:run.stop]) for run in runs]
        else:
            parts = [(run, heavy_ball_(buf[run.start:run.stop], direction[run.start:run.stop],
                                       momenta[run.group], nesterov=nesterov, first=first))
                     for run in runs]
    for run, step_vector in parts:
        torch.mul(step_vector, lrs[run.group], out=out[run.start:run.stop])
    zero_spans_(out, held)
