"""The torch optimizers ``mlbfgs-train`` runs besides mL-BFGS, to compare against.

``sgd``, ``adam``, ``adamw`` and ``lbfgs`` are ``torch.optim`` classes as they are. ``muon``
is ``torch.optim.Muon`` used as torch's documentation says: Muon is meant for the 2-D
weights of hidden layers, and everything else (embeddings, biases, norms, convolution
filters, the output layer) is trained by AdamW. :class:`MuonWithAdamW` holds the two as one
``torch.optim.Optimizer``, so that one LR schedule, one ``step()`` and one checkpoint serve
both halves.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

#: torch's defaults (``torch.optim.Muon``, ``torch.optim.AdamW``): the ``mlbfgs-train``
#: defaults of ``--momentum``, ``--nesterov`` and ``--weight-decay`` for ``muon``/``adamw``.
MUON_MOMENTUM = 0.95
MUON_NESTEROV = True
MUON_WEIGHT_DECAY = 0.1
ADAMW_WEIGHT_DECAY = 0.01

NamedParams = list[tuple[str, nn.Parameter]]


def muon_param_split(model: nn.Module) -> tuple[NamedParams, NamedParams]:
    """``(muon, adamw)``: the trainable parameters Muon takes, and the rest.

    Muon takes the weight matrix of every ``nn.Linear`` except the model's last one (its
    output layer: the last ``nn.Linear`` registered, true of every model of
    :mod:`mlbfgs_hpc.models`); AdamW takes everything else: embeddings, biases, norms,
    convolution filters and the output layer.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    hidden = {id(m.weight) for m in linears[:-1]}
    muon: NamedParams = []
    adamw: NamedParams = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon if id(param) in hidden and param.dim() == 2 else adamw).append((name, param))
    return muon, adamw


class MuonWithAdamW(torch.optim.Optimizer):
    """``torch.optim.Muon`` on some parameters and ``torch.optim.AdamW`` on the others, as
    one optimizer (:func:`muon_param_split` chooses which).

    Its ``param_groups`` are the two optimizers' groups (Muon's first), each tagged with
    ``"role"`` (``"muon"`` or ``"adamw"``), so an LR scheduler scales both lrs alike;
    ``state_dict()`` holds the two optimizers' state dicts.

    Args:
        muon_params: 2-D weights of hidden layers (at least one).
        adamw_params: every other trainable parameter (may be empty).
        lr: Muon's learning rate (before torch's per-shape adjustment).
        adamw_lr: AdamW's learning rate.
        momentum: Muon's momentum (torch's default 0.95).
        nesterov: Muon's Nesterov momentum (torch's default ``True``).
        weight_decay: decoupled weight decay of both halves; ``None``: torch's defaults,
            :data:`MUON_WEIGHT_DECAY` for Muon and :data:`ADAMW_WEIGHT_DECAY` for AdamW.

    Raises:
        ValueError: no parameter for Muon (a model without hidden linear layers), or a
            value torch's optimizers reject.
    """

    def __init__(self, *, muon_params: Iterable[nn.Parameter],
                 adamw_params: Iterable[nn.Parameter], lr: float, adamw_lr: float,
                 momentum: float = MUON_MOMENTUM, nesterov: bool = MUON_NESTEROV,
                 weight_decay: float | None = None) -> None:
        muon_list, adamw_list = list(muon_params), list(adamw_params)
        if not muon_list:
            raise ValueError("Muon needs at least one 2-D weight of a hidden layer; this model "
                             "has none (its only linear layer is the output layer)")
        self.muon = torch.optim.Muon(
            [{"params": muon_list, "role": "muon"}], lr=lr, momentum=momentum,
            nesterov=nesterov,
            weight_decay=MUON_WEIGHT_DECAY if weight_decay is None else weight_decay)
        self.adamw = (torch.optim.AdamW(
            [{"params": adamw_list, "role": "adamw"}], lr=adamw_lr,
            weight_decay=ADAMW_WEIGHT_DECAY if weight_decay is None else weight_decay)
            if adamw_list else None)
        # The inner optimizers' group dicts themselves: a scheduler's changes reach them.
        super().__init__(self._inner_groups(), defaults={})

    def _inner(self) -> list[torch.optim.Optimizer]:
        return [self.muon] if self.adamw is None else [self.muon, self.adamw]

    def _inner_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self._inner() for group in opt.param_groups]

    def peak_lrs(self, *, lr: float, adamw_lr: float) -> list[float]:
        """Per param group, ``lr`` (Muon's) or ``adamw_lr``: what an LR schedule starts
        from."""
        return [adamw_lr if group["role"] == "adamw" else lr for group in self.param_groups]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._inner():
            opt.step()
        return loss

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"muon": self.muon.state_dict(),
                "adamw": None if self.adamw is None else self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        if set(state_dict) != {"muon", "adamw"} or (
                (state_dict["adamw"] is None) != (self.adamw is None)):
            raise ValueError("not a MuonWithAdamW state dict for this parameter split")
        self.muon.load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
        # Loading gives the inner optimizers new group dicts: take them again.
        self.param_groups = self._inner_groups()


def build_baseline(name: str, *, model: nn.Module, params: Sequence[nn.Parameter], lr: float,
                   momentum: float, nesterov: bool, weight_decay: float | None,
                   adamw_lr: float | None = None, history_size: int = 10, max_iter: int = 1,
                   lbfgs_settings: dict[str, Any] | None = None) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer ``name`` (``sgd``, ``adam``, ``adamw``, ``lbfgs`` or
    ``muon``) over ``params`` (``muon``: over ``model``'s trainable parameters, split by
    :func:`muon_param_split`).

    Args:
        name: the optimizer.
        model: the model (``muon`` splits its parameters).
        params: the parameters to train (the others).
        lr: the learning rate (``muon``: Muon's).
        momentum: SGD's and Muon's momentum.
        nesterov: SGD's and Muon's Nesterov momentum.
        weight_decay: weight decay; ``None`` only for ``muon`` (torch's default per half).
        adamw_lr: ``muon`` only: the AdamW half's learning rate.
        history_size: ``lbfgs`` only.
        max_iter: ``lbfgs`` only: iterations per ``step()`` (1: one per batch; a full-batch
            PINN takes torch's 20).
        lbfgs_settings: ``lbfgs`` only: extra param-group entries (the line search).

    Raises:
        ValueError: an unknown name, or a setting the optimizer rejects.
    """
    if name == "muon":
        muon, adamw = muon_param_split(model)
        if adamw_lr is None:
            raise ValueError("muon needs adamw_lr (the AdamW half's learning rate)")
        return MuonWithAdamW(muon_params=[p for _, p in muon], adamw_params=[p for _, p in adamw],
                             lr=lr, adamw_lr=adamw_lr, momentum=momentum, nesterov=nesterov,
                             weight_decay=weight_decay)
    if weight_decay is None:
        raise ValueError(f"{name} needs a weight_decay (None is muon's per-half default)")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "lbfgs":
        # max_iter iterations per step(), each a fixed step of length lr or (a line search)
        # the length torch's strong-Wolfe search finds, starting from lr.
        return torch.optim.LBFGS(params, lr=lr, max_iter=max_iter, history_size=history_size,
                                 **(lbfgs_settings or {}))
    raise ValueError(f"unknown optimizer {name!r}")
