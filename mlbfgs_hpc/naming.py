"""Names of a model's parameters that do not depend on how the model is wrapped.

``torch.compile(model)`` returns a module that holds the original as ``_orig_mod``, and
``DistributedDataParallel``/``DataParallel`` hold it as ``module``, so the same weight is
``fc.weight``, ``_orig_mod.fc.weight`` or ``module.fc.weight`` depending on the wrapper. The
optimizer's blocks and the checkpoints name parameters by their *canonical* names, those of
the unwrapped model, so that state saved with one wrapping loads with another::

    model                         named_parameters()           canonical
    Net                           fc.weight                    fc.weight
    torch.compile(Net)            _orig_mod.fc.weight          fc.weight
    DDP(Net)                      module.fc.weight             fc.weight
    Net with torch.compile(enc)   enc._orig_mod.layer.weight   enc.layer.weight

``_orig_mod`` is the attribute torch.compile reserves, so removing that path component
anywhere is safe; ``module.`` is only removed by unwrapping a DDP/DataParallel wrapper
(a user's own submodule may well be called ``module``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

#: The attribute under which ``torch.compile``'s wrapper holds the compiled module.
COMPILED_ATTRIBUTE = "_orig_mod"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, ``DistributedDataParallel`` and ``DataParallel``
    wrappers (any nesting of them); ``model`` itself when it is not wrapped."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, COMPILED_ATTRIBUTE, None), nn.Module):
            model = getattr(model, COMPILED_ATTRIBUTE)
        else:
            return model


def canonical_name(name: str) -> str:
    """``name`` without ``torch.compile``'s ``_orig_mod`` path components."""
    if COMPILED_ATTRIBUTE not in name:
        return name
    return ".".join(part for part in name.split(".") if part != COMPILED_ATTRIBUTE)


def canonical_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` of the unwrapped model, keyed by canonical names."""
    return {canonical_name(k): v for k, v in unwrap_model(model).state_dict().items()}


def load_canonical_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a state keyed by canonical names (or by names with ``_orig_mod`` components,
    as written before names were canonical) into ``model``, however it is wrapped.

    Raises:
        RuntimeError: as ``load_state_dict(strict=True)``, for missing or unexpected keys.
    """
    inner = unwrap_model(model)
    actual = {canonical_name(k): k for k in inner.state_dict()}
    inner.load_state_dict({actual.get(canonical_name(k), k): v for k, v in state.items()},
                          strict=True)
