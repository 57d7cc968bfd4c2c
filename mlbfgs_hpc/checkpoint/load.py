"""Loading a checkpoint into a model, optimizer and scheduler on any world size.

Restart (:func:`load_checkpoint`, collective) works on any world size: rank 0 resolves the
checkpoint and broadcasts the manifest; the optimizer, built for the new world size, knows the
blocks it owns, and each rank opens only ``common.h5``, the shards holding its blocks and the
shard of rank ``rank % saved_world_size`` for its RNG states (per-rank streams such as dropout
masks continue exactly only on the same world size; streams seeded identically on all ranks,
e.g. data shuffling, continue exactly on any world size). Every file a rank opens is checked
against its manifest sha256 first. Reads are staged, success is agreed with an all-gather, and
only then is anything modified, so an error on one rank raises the same
:class:`CheckpointError` on every rank instead of hanging the job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..comm import LocalCommunicator
from ..naming import canonical_name, load_canonical_state_dict
from ..optimizer import MLBFGS
from .collective import agree, check_comm, failure_of
from .errors import ERROR_CLASSES, CheckpointError, CheckpointMismatchError
from .manifest import (
    class_path,
    find_latest_valid,
    model_table,
    optimizer_kind,
    read_manifest,
    resolve_checkpoint,
)
from .reader import CheckpointReader
from .rng import RngState

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """What :func:`load_checkpoint` restored.

    Attributes:
        path: the checkpoint directory.
        step: the training step it was written at.
        world_size: the number of ranks that wrote it.
        extra: the caller's ``extra`` dict (data-order position etc.).
        config: the run configuration given to :func:`save_checkpoint`.
        manifest: the whole manifest.
    """

    path: Path
    step: int
    world_size: int
    extra: dict[str, Any]
    config: dict[str, Any]
    manifest: dict[str, Any] = field(repr=False)


@dataclass(kw_only=True)
class _Staged:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: Any
    rng: RngState | None


def _model_mismatch(manifest: dict[str, Any], model: torch.nn.Module, where: Path) -> None:
    # Canonical names on both sides: checkpoints written before names were canonical hold a
    # compiled model's ``_orig_mod.`` ones.
    saved = {canonical_name(e["name"]): e for e in manifest["model"]}
    mine = {e["name"]: e for e in model_table(model)}
    problems: list[str] = []
    missing = [n for n in saved if n not in mine]
    unexpected = [n for n in mine if n not in saved]
    if missing:
        problems.append(f"in the checkpoint but not in the model: {', '.join(missing)}")
    if unexpected:
        problems.append(f"in the model but not in the checkpoint: {', '.join(unexpected)}")
    shapes = [f"{n}: checkpoint {tuple(saved[n]['shape'])} vs model {tuple(mine[n]['shape'])}"
              for n in saved if n in mine and saved[n]["shape"] != mine[n]["shape"]]
    if shapes:
        problems.append("shapes differ: " + "; ".join(shapes))
    if problems:
        raise CheckpointMismatchError(f"the model does not match checkpoint {where}: "
                                      + "; ".join(problems))
    dtypes = [f"{n} ({saved[n]['dtype']} -> {mine[n]['dtype']})"
              for n in saved if saved[n]["dtype"] != mine[n]["dtype"]]
    if dtypes:
        logger.warning("checkpoint %s: converting dtypes on load: %s", where, ", ".join(dtypes))


def _optimizer_mismatch(manifest: dict[str, Any], optimizer: torch.optim.Optimizer,
                        where: Path) -> None:
    saved = manifest["optimizer"]
    if saved["kind"] != optimizer_kind(optimizer) or (
            saved["kind"] == "torch" and saved["class"] != class_path(optimizer)):
        raise CheckpointMismatchError(f"checkpoint {where} holds the state of a "
                                      f"{saved['class']}, the optimizer is a "
                                      f"{class_path(optimizer)}")
    if not isinstance(optimizer, MLBFGS):
        return
    table = manifest["blocks"]
    diffs = [f"block {b}: checkpoint {saved_b['name']} {saved_b['param_names']} "
             f"{saved_b['shapes']} vs optimizer {block.name} {list(block.param_names)} "
             f"{[list(s) for s in block.shapes]}"
             for b, (saved_b, block) in enumerate(zip(table, optimizer.blocks))
             if (canonical_name(saved_b["name"]), list(map(canonical_name,
                                                           saved_b["param_names"])),
                 saved_b["shapes"]) !=
             (canonical_name(block.name), list(map(canonical_name, block.param_names)),
              [list(s) for s in block.shapes])]
    if len(table) != len(optimizer.blocks) or diffs:
        raise CheckpointMismatchError(
            f"the optimizer's blocks do not match checkpoint {where}: {len(table)} saved vs "
            f"{len(optimizer.blocks)} blocks; " + "; ".join(diffs[:5]))
    saved_config = saved.get("config", {})
    m_saved = saved_config.get("history_size")
    if m_saved != optimizer.config.history_size:
        raise CheckpointMismatchError(
            f"checkpoint {where} has history_size={m_saved}, the optimizer "
            f"history_size={optimizer.config.history_size}: the history rings cannot be loaded")
    # Other settings that differ keep the optimizer's value; MLBFGS.load_state_dict says so.


def _stage(reader: CheckpointReader, *, model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: Any, rank: int,
           restore_rng: bool) -> _Staged:
    """Everything this rank needs, read and checked, with nothing modified yet."""
    manifest = reader.manifest
    _model_mismatch(manifest, model, reader.path)
    _optimizer_mismatch(manifest, optimizer, reader.path)
    model_state = reader.model_state()
    optimizer_state = reader.optimizer_state()
    if isinstance(optimizer, MLBFGS):
        optimizer_state = {**optimizer_state,
                           "state": {b: reader.block_state(b) for b in optimizer.owned_blocks}}
    scheduler_state = None
    if scheduler is not None:
        scheduler_state = reader.scheduler_state()
        if scheduler_state is None:
            logger.warning("checkpoint %s holds no LR scheduler state; the scheduler starts "
                           "fresh", reader.path)
        elif manifest.get("scheduler") != class_path(scheduler):
            raise CheckpointMismatchError(
                f"checkpoint {reader.path} holds the state of a {manifest.get('scheduler')}, "
                f"the scheduler is a {class_path(scheduler)}")
    rng = reader.rng_state(rank % reader.world_size) if restore_rng else None
    return _Staged(model_state=model_state, optimizer_state=optimizer_state,
                   scheduler_state=scheduler_state, rng=rng)


def _apply(staged: _Staged, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           scheduler: Any, where: Path, warn_changed_settings: bool) -> None:
    try:
        load_canonical_state_dict(model, staged.model_state)
        if isinstance(optimizer, MLBFGS):
            optimizer.load_state_dict(staged.optimizer_state,
                                      warn_changed_settings=warn_changed_settings)
        else:
            optimizer.load_state_dict(staged.optimizer_state)
        if scheduler is not None and staged.scheduler_state is not None:
            scheduler.load_state_dict(staged.scheduler_state)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise CheckpointMismatchError(f"checkpoint {where} does not fit: {exc}") from exc
    if staged.rng is not None:
        staged.rng.restore()


def load_checkpoint(path: str | Path, *, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: LocalCommunicator,
                    scheduler: Any = None, restore_rng: bool = True,
                    verify_digests: bool = True,
                    warn_changed_settings: bool = True) -> LoadedCheckpoint:
    """Restore model, optimizer, scheduler and RNG states from a checkpoint (collective).

    The checkpoint may have been written on any number of ranks; the optimizer must be built
    for the current world size (it knows which blocks this rank owns).

    Args:
        path: a checkpoint directory, or a run directory (rank 0 picks its newest valid
            checkpoint and broadcasts the choice).
        model: the model; its parameter and buffer names and shapes must match.
        optimizer: the same kind of optimizer that wrote the checkpoint.
        comm: the communicator (the optimizer's, for mL-BFGS).
        scheduler: an LR scheduler to restore, or ``None``.
        restore_rng: restore the torch/numpy/python (and CUDA) RNG states; rank r gets
            those of saved rank ``r % saved_world_size``.
        verify_digests: check the sha256 of every file a rank opens.
        warn_changed_settings: log the mL-BFGS settings (``update_freq``, ...) that differ
            from the checkpoint's (the optimizer's values apply); ``mlbfgs-train`` passes
            ``False``, it reports every changed flag itself.

    Returns:
        The step, ``extra``, ``config``, path and world size of the checkpoint.

    Raises:
        CheckpointMismatchError: model or optimizer do not match (names the entries).
        CheckpointSchemaError: unknown schema version.
        CheckpointCorruptError: a file is missing or damaged (names it).
        CheckpointError: any other failure. Every error is raised on every rank.
    """
    check_comm(comm, optimizer)
    resolved: tuple[Any, ...] | None = None
    if comm.rank == 0:
        try:
            ckpt = resolve_checkpoint(path)
            resolved = (str(ckpt), read_manifest(ckpt), None)
        except CheckpointError as exc:
            resolved = (None, None, failure_of(exc))
    ckpt_name, manifest, failure = comm.broadcast_object(resolved)
    if failure is not None:
        raise ERROR_CLASSES.get(failure[0], CheckpointError)(failure[1])
    ckpt = Path(ckpt_name)

    staged: _Staged | None = None
    failure = None
    reader = CheckpointReader.from_manifest(path=ckpt, manifest=manifest,
                                            verify_digests=verify_digests)
    try:
        staged = _stage(reader, model=model, optimizer=optimizer, scheduler=scheduler,
                        rank=comm.rank, restore_rng=restore_rng)
    except Exception as exc:  # must reach the other ranks, see agree
        failure = failure_of(exc)
    finally:
        reader.close()
    agree(comm, failure, f"loading checkpoint {ckpt}")
    assert staged is not None
    failure = None
    try:
        _apply(staged, model=model, optimizer=optimizer, scheduler=scheduler, where=ckpt,
               warn_changed_settings=warn_changed_settings)
    except Exception as exc:  # must reach the other ranks, see agree
        failure = failure_of(exc)
    agree(comm, failure, f"applying checkpoint {ckpt}")
    if manifest["world_size"] != comm.size:
        logger.info("resumed a %d-rank checkpoint on %d ranks", manifest["world_size"],
                    comm.size)
    if comm.rank == 0:
        logger.info("loaded checkpoint %s (step %d)", ckpt, manifest["step"])
    return LoadedCheckpoint(path=ckpt, step=int(manifest["step"]),
                            world_size=int(manifest["world_size"]),
                            extra=dict(manifest.get("extra") or {}),
                            config=dict(manifest.get("config") or {}), manifest=manifest)


def resume(run_dir: str | Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
           comm: LocalCommunicator, scheduler: Any = None,
           restore_rng: bool = True) -> LoadedCheckpoint | None:
    """Load the newest valid checkpoint of ``run_dir``, or return ``None`` (collective).

    Rank 0 scans the checkpoints (skipping damaged ones with a warning) and broadcasts its
    choice, so every rank loads the same one.
    """
    choice = None
    if comm.rank == 0:
        latest = find_latest_valid(run_dir)
        choice = None if latest is None else str(latest)
    choice = comm.broadcast_object(choice)
    if choice is None:
        if comm.rank == 0:
            logger.info("no valid checkpoint under %s: starting fresh", run_dir)
        return None
    return load_checkpoint(choice, model=model, optimizer=optimizer, comm=comm,
                           scheduler=scheduler, restore_rng=restore_rng)
