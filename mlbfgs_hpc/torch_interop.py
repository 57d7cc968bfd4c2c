"""What torch's machinery does to an optimizer, done right for :class:`~mlbfgs_hpc.MLBFGS`.

* **Hooks released with the optimizer.** The optimizer puts a post-accumulate-grad hook on
  every parameter that requires a gradient (and Horovod's reducer one more; torch refuses a
  hook on a frozen one, so those get theirs when unfrozen, :meth:`ReleasedHooks.attach`);
  the parameters outlive the optimizer, so the hooks are removed when it is
  garbage-collected, never accumulated by a sweep that builds many optimizers on one
  model.
* **Copies and pickles.** ``copy.deepcopy`` and ``pickle`` rebuild the optimizer from its
  constructor arguments and load its :meth:`state_dict` (:func:`rebuild`), so the copy steps
  exactly as the original would; ``deepcopy((model, optimizer))`` gives a copy that
  optimizes the copied model. Split over several ranks the state is not in one process, so
  copying raises and names ``state_dict()`` as the way.
* **torch.distributed.checkpoint.** ``get_optimizer_state_dict`` / ``set_optimizer_state_dict``
  map an optimizer's state onto parameter names; MLBFGS's state is per block and per rank
  (rings over whole blocks, owned by one rank each), which that mapping cannot express. They
  are refused with a clear error pointing to the package's HDF5 checkpoints, before anything
  is changed: DCP first "initialises" an optimizer by calling ``step()`` with zero gradients
  and lr 0, which for MLBFGS would advance the counters and EMAs, so :meth:`step` returns at
  once when DCP calls it (:func:`called_by_distributed_checkpoint`).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

#: The module of torch.distributed.checkpoint's (get|set)_(optimizer_)state_dict.
DCP_STATE_DICT_MODULE = "torch.distributed.checkpoint.state_dict"
#: How far up the stack the caller is looked for (through torch's step wrappers).
_CALLER_DEPTH = 8

DCP_REFUSAL = (
    "torch.distributed.checkpoint's optimizer state dicts map state onto parameter names; "
    "MLBFGS keeps its state per block of layers and splits the blocks over the ranks, which "
    "that format cannot hold. Save and resume with the package's sharded HDF5 checkpoints "
    "instead: mlbfgs_hpc.checkpoint.save_checkpoint(run_dir, step=..., model=model, "
    "optimizer=optimizer, comm=comm) and load_checkpoint(path, model=..., optimizer=..., "
    "comm=...), which resume bit for bit on any number of ranks; or "
    "optimizer.state_dict() / load_state_dict() on one process.")


def called_by_distributed_checkpoint() -> bool:
    """Whether torch.distributed.checkpoint's state-dict functions are the caller (looked
    for a few frames up the stack)."""
    frame = sys._getframe(1)
    for _ in range(_CALLER_DEPTH):
        if frame is None:
            return False
        if frame.f_globals.get("__name__") == DCP_STATE_DICT_MODULE:
            return True
        frame = frame.f_back
    return False


def refuse_distributed_checkpoint() -> None:
    """Raise ``NotImplementedError`` (:data:`DCP_REFUSAL`) when called from
    torch.distributed.checkpoint's state-dict functions."""
    if called_by_distributed_checkpoint():
        raise NotImplementedError(DCP_REFUSAL)


class ReleasedHooks:
    """Calls the bound ``method`` of its object from the parameters' post-accumulate-grad
    hooks, through a weak reference (the parameters must not keep the object alive), and
    removes the hooks when the object is garbage-collected (calling ``also`` then).

    Args:
        method: a bound method (its ``__self__`` is the owner).
        params: the parameters; those that require a gradient are hooked now, the others
            by :meth:`attach` once they do.
        also: called when the owner is collected (e.g. the reducer's ``remove_hooks``).
    """

    def __init__(self, method: Callable[[torch.Tensor], None], params: Sequence[torch.Tensor],
                 *, also: Callable[[], None] | None = None) -> None:
        weak = weakref.WeakMethod(method)  # type: ignore[arg-type]

        def hook(param: torch.Tensor) -> None:
            bound = weak()
            if bound is not None:
                bound(param)

        self._hook, self._params = hook, list(params)
        self._handles: dict[int, Any] = {}
        weakref.finalize(method.__self__, _remove_hooks, self._handles,  # type: ignore[attr-defined]
                         also)
        self.attach()

    def attach(self) -> bool:
        """Hook the parameters that require a gradient and have no hook yet (unfrozen since
        the last call); whether there were any."""
        added = False
        for index, param in enumerate(self._params):
            if param.requires_grad and index not in self._handles:
                self._handles[index] = param.register_post_accumulate_grad_hook(self._hook)
                added = True
        return added


def _remove_hooks(handles: dict[int, Any], also: Callable[[], None] | None) -> None:
    for handle in handles.values():
        handle.remove()
    handles.clear()
    if also is not None:
        also()


def copy_reduction(optimizer: Any, constructor_kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """``__reduce__`` of an MLBFGS: rebuild from the param groups, blocks and constructor
    arguments, then load the state (see the module docstring).

    Raises:
        TypeError: the optimizer runs on several ranks.
    """
    if optimizer.comm.size > 1:
        raise TypeError(
            f"an MLBFGS on {optimizer.comm.size} ranks cannot be copied or pickled: each rank "
            "holds only its blocks' state. Use optimizer.state_dict() on every rank (or "
            "mlbfgs_hpc.checkpoint.save_checkpoint) and load it into an MLBFGS built afresh "
            "on every rank")
    groups = [{**group, "params": list(group["params"])} for group in optimizer.param_groups]
    return (rebuild, (type(optimizer), groups, list(optimizer.blocks), constructor_kwargs,
                      optimizer.state_dict()))


def rebuild(cls: type, groups: list[dict[str, Any]], blocks: list[Any],
            constructor_kwargs: dict[str, Any], state: dict[str, Any]) -> Any:
    """The other half of :func:`copy_reduction`."""
    optimizer = cls(groups, blocks=blocks, **constructor_kwargs)
    optimizer.load_state_dict(state, warn_changed_settings=False)
    return optimizer
