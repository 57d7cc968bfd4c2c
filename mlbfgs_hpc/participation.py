"""Which parameters take part in a step: torch's rule, read at every step, the same on all ranks.

A ``torch.optim`` optimizer steps a parameter only when its ``.grad`` is not ``None``. MLBFGS
does the same, and also leaves alone a parameter frozen (``requires_grad=False``) at step
time, whatever its ``.grad`` holds. A parameter is *idle* in a step when it is frozen or has
no gradient **on every rank**; where some ranks have a gradient and others ``None``, it takes
part and the ``None`` ranks count zeros (Horovod's and DDP's convention: the gradient
averaging already sends zeros for them). An idle parameter is:

* not moved: no update, no weight decay, its outer momentum buffer waits (as SGD's
  ``momentum_buffer`` does while its parameter has no gradient);
* not fed to the curvature: its entries of the EMAs ``m_param``/``m_grad`` are held, so its
  block's next pair sees only the movement it had while it took part (no fake zero
  gradient, which would claim the gradient fell to 0 while the parameter stood still); the
  direction ``H·g`` is zero on its entries (its gradient is), and a block none of whose
  parameters moved since its last snapshot offers no pair at all.

A parameter's EMAs start at its first step with a gradient (as they start at step 1 for the
others), and its snapshot entries with them, so a layer unfrozen at step 500 enters its
block's pairs with what it did since step 500. The count of steps at which each parameter
took part is block state (``grad_steps``), checkpointed with the rest.

One collective, folded into the step's first allgather: each rank packs its "idle here"
flags into float64 words (52 flags each, exact), the step ANDs them over the ranks::

    rank r:   idle_r[i] = not requires_grad(i) or grad(i) is None (before averaging)
    row_r = [..., *pack_bits(idle_r)]  ──allgather──►  idle[i] = AND over r   (same everywhere)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from .layout import ParamSpan

#: Flags per float64 word of the allgather: integers below 2**53 are exact in a float64.
BITS_PER_WORD = 52

T = TypeVar("T")


def pack_bits(flags: Sequence[bool]) -> list[float]:
    """``flags`` as ``ceil(len / 52)`` floats holding 52 bits each (bit ``i % 52`` of word
    ``i // 52`` is flag ``i``)."""
    words = []
    for start in range(0, len(flags), BITS_PER_WORD):
        word = 0
        for bit, flag in enumerate(flags[start:start + BITS_PER_WORD]):
            if flag:
                word |= 1 << bit
        words.append(float(word))
    return words


def common_bits(rows: np.ndarray, count: int) -> list[int]:
    """The flags set in every row of ``rows`` (ranks × words from :func:`pack_bits`), as the
    indices ``< count`` of the flags."""
    common = []
    for w in range(rows.shape[1]):
        word = (1 << BITS_PER_WORD) - 1
        for value in rows[:, w]:
            word &= int(value)
        for bit in range(BITS_PER_WORD):
            index = w * BITS_PER_WORD + bit
            if index < count and word >> bit & 1:
                common.append(index)
    return common


def words_for(count: int) -> int:
    """How many words :func:`pack_bits` makes for ``count`` flags."""
    return -(-count // BITS_PER_WORD)


def refuse_sparse_gradient(name: str, param: torch.Tensor) -> None:
    """Raise if ``param`` holds a sparse gradient (an ``Embedding(sparse=True)``): the
    optimizer's buffers are dense, and torch's reshape of a sparse tensor fails obscurely."""
    grad = param.grad
    if grad is not None and grad.layout != torch.strided:
        raise RuntimeError(
            f"parameter {name!r} has a sparse gradient ({grad.layout}), which MLBFGS cannot "
            "use: build its embedding with sparse=False, or optimize it with an optimizer "
            "for sparse gradients (e.g. torch.optim.SparseAdam) and give MLBFGS the others")


@dataclass(frozen=True)
class StepParticipation:
    """One step's decision, identical on every rank.

    Attributes:
        idle: layout indices of the idle parameters (see the module docstring).
        held: spans of this rank's owned idle parameters (their state waits).
        starting: spans of owned parameters taking part for the first time, after the run's
            first step (their EMAs and snapshots start now).
    """

    idle: frozenset[int] = frozenset()
    held: tuple[ParamSpan, ...] = ()
    starting: tuple[ParamSpan, ...] = ()

    @property
    def everyone(self) -> bool:
        """Every parameter takes part (the usual step: no masking anywhere)."""
        return not self.idle

    def moving(self, per_param: list[T]) -> list[T]:
        """The entries of ``per_param`` (one per parameter, layout order) of the parameters
        taking part (``per_param`` itself when all do)."""
        if not self.idle:
            return per_param
        return [item for i, item in enumerate(per_param) if i not in self.idle]


#: The usual step: every parameter takes part.
EVERYONE = StepParticipation()


class ParticipationTracker:
    """Reads, at every step, which parameters have a gradient and are trainable, and counts
    per owned parameter the steps at which it took part.

    Args:
        params: every parameter of the optimizer, in layout (block) order.
        names: their names.
        spans: the owned parameters' spans (:attr:`~mlbfgs_hpc.layout.LocalLayout.param_spans`).
        first_param: the layout index of the first owned parameter.
    """

    def __init__(self, *, params: Sequence[torch.Tensor], names: Sequence[str],
                 spans: Sequence[ParamSpan], first_param: int) -> None:
        self.params, self.names = list(params), list(names)
        self.spans = list(spans)
        self.first_param = first_param
        #: Per owned parameter (flat order): the steps at which it took part.
        self.grad_steps = [0] * len(self.spans)
        self._all_started = not self.spans   # every owned parameter has taken part once
        self._none_before_averaging: list[bool] | None = None

    # ---- this rank's view --------------------------------------------------------------
    def check_dense(self) -> None:
        """Refuse sparse gradients (call on new gradients, before anything reads them)."""
        for name, param in zip(self.names, self.params):
            refuse_sparse_gradient(name, param)

    def before_averaging(self) -> None:
        """Record which gradients are ``None`` before the averaging fills them with zeros
        (call just before the gradients are averaged over several ranks)."""
        self._none_before_averaging = [p.grad is None for p in self.params]

    def local_idle(self) -> list[bool]:
        """Per parameter: frozen, or without gradient on this rank (now, or before the last
        averaging filled in zeros)."""
        before = self._none_before_averaging or [False] * len(self.params)
        return [not param.requires_grad or param.grad is None or none_before
                for param, none_before in zip(self.params, before)]

    def frozen_owned(self) -> list[ParamSpan]:
        """Spans of the owned parameters frozen on this rank: their (stale) gradients count
        as zeros before anything is measured."""
        first = self.first_param
        return [span for j, span in enumerate(self.spans)
                if not self.params[first + j].requires_grad]

    # ---- the decision ----------------------------------------------------------------------
    def decide(self, word_rows: np.ndarray, *, first_step: bool) -> StepParticipation:
        """The step's participation from every rank's words (ranks × :func:`words_for`);
        ``first_step``: the run's first step (every EMA starts there anyway)."""
        idle = frozenset(common_bits(word_rows, len(self.params)))
        if not idle and (first_step or self._all_started):
            return EVERYONE
        first = self.first_param
        held = tuple(span for j, span in enumerate(self.spans) if first + j in idle)
        starting = () if first_step else tuple(
            span for j, span in enumerate(self.spans)
            if first + j not in idle and self.grad_steps[j] == 0)
        return StepParticipation(idle=idle, held=held, starting=starting)

    def commit(self, decision: StepParticipation) -> None:
        """Count the step for the owned parameters that took part."""
        if decision.everyone:
            self.grad_steps = [count + 1 for count in self.grad_steps]
        else:
            first = self.first_param
            self.grad_steps = [count + (first + j not in decision.idle)
                               for j, count in enumerate(self.grad_steps)]
        self._all_started = all(self.grad_steps)

    def lagging_blocks(self, step: int) -> set[int]:
        """Positions of the owned blocks with a parameter that sat out some of the ``step``
        steps so far (only those can have a pair with nothing in it)."""
        return {span.block for span, count in zip(self.spans, self.grad_steps) if count < step}

    # ---- state ---------------------------------------------------------------------------
    def block_grad_steps(self, block: int) -> torch.Tensor:
        """``grad_steps`` of the parameters of owned block ``block`` (its position)."""
        return torch.tensor([c for span, c in zip(self.spans, self.grad_steps)
                             if span.block == block], dtype=torch.int64)

    def load_block_grad_steps(self, block: int, counts: torch.Tensor | None, *,
                              steps: int) -> None:
        """Set the counts of owned block ``block``'s parameters (saved by
        :meth:`block_grad_steps`). ``None``: a state saved before parameters could sit
        steps out, when every one took part in each of the ``steps`` steps."""
        members = [j for j, span in enumerate(self.spans) if span.block == block]
        values = ([steps] * len(members) if counts is None
                  else [int(v) for v in counts.reshape(-1).tolist()])
        if len(values) != len(members):
            raise ValueError(f"grad_steps has {len(values)} entries for a block of "
                             f"{len(members)} parameters")
        for j, value in zip(members, values):
            self.grad_steps[j] = value
        self._all_started = all(self.grad_steps)
