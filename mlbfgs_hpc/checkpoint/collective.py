"""Collective error handling: a failure on one rank becomes the same error on every rank
(all-gathered), instead of a job whose other ranks wait forever."""

from __future__ import annotations

import torch

from ..comm import LocalCommunicator
from ..optimizer import MLBFGS
from .errors import ERROR_CLASSES, CheckpointError


def failure_of(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, CheckpointError):
        return type(exc).__name__, str(exc)
    return "CheckpointError", f"{type(exc).__name__}: {exc}"


def agree(comm: LocalCommunicator, failure: tuple[str, str] | None, action: str) -> None:
    """All-gather each rank's failure; raise the same error on every rank if any failed."""
    gathered = comm.allgather_object(
        None if failure is None else (failure[0], failure[1], comm.hostname))
    bad = [(rank, item) for rank, item in enumerate(gathered) if item is not None]
    if not bad:
        return
    classes = {item[0] for _, item in bad}
    cls = ERROR_CLASSES.get(classes.pop(), CheckpointError) if len(classes) == 1 \
        else CheckpointError
    if comm.size == 1:
        raise cls(bad[0][1][1])
    by_message: dict[str, list[str]] = {}
    for rank, (_, message, host) in bad:
        by_message.setdefault(message, []).append(f"{rank} ({host})")
    details = "; ".join(f"rank {', '.join(ranks)}: {message}"
                        for message, ranks in by_message.items())
    raise cls(f"{action} failed on {len(bad)} of {comm.size} ranks: {details}")


def check_comm(comm: LocalCommunicator, optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer, MLBFGS) and (optimizer.comm.size != comm.size
                                          or optimizer.comm.rank != comm.rank):
        raise ValueError(f"comm (rank {comm.rank} of {comm.size}) must be the optimizer's "
                         f"communicator (rank {optimizer.comm.rank} of {optimizer.comm.size})")
