"""Writing a checkpoint: :func:`save_checkpoint` (collective: every rank calls it).

Protocol::

    rank 0: mkdir .tmp-step-S-<token>      -> broadcast name; every rank checks it sees the
                                              directory (node-local storage -> clear error)
    every rank: write shard (+ rank 0: common.h5), flush, fsync, sha256
    allgather(success, size, digest)       -> any failure: all ranks raise, tmp dir removed
    rank 0: check every shard is visible, write manifest.json, fsync file and directory,
            rename .tmp-step-S-<token> -> step-S, fsync checkpoints/, replace `latest`
            (write + fsync + os.replace), delete all but the newest `keep` checkpoints
    broadcast(outcome)                     -> every rank returns the same path or raises

HDF5 content (``h5ls -r`` shows exactly these paths)::

    common.h5
      /                    attrs: format, schema_version, kind="common", step, world_size
      /model/<name>        one dataset per entry of model.state_dict() (parameters AND buffers;
                           rank 0's buffers, e.g. its BatchNorm running statistics), under
                           canonical names: those of the model inside torch.compile/DDP
                           wrappers (mlbfgs_hpc.naming), so any wrapping loads any other
      /optimizer           attrs: kind ("mlbfgs" | "torch"), class, tree (JSON, see ``tree``)
      /optimizer/<path>    tensors of the optimizer's state_dict():
                           mL-BFGS: global/<counter>, without the per-block state;
                           torch optimizers (SGD, Adam, LBFGS, ...): their whole state_dict,
                           e.g. state/0/exp_avg (replicated on all ranks, rank 0's is saved)
      /scheduler           attrs: class, tree (JSON); tensors (if any) below it
    shard-RRRRR-of-WWWWW.h5
      /                    attrs: format, schema_version, kind="shard", rank, world_size, step, host
      /blocks/<BBBBBB>     one group per mL-BFGS block owned by the rank that wrote the shard;
                           attrs: name, numel, param_names (JSON)
        m_param m_grad snap_param snap_grad momentum_buffer   (numel,)   flat buffers
        grad_steps                                             (params,)  steps each parameter
                                                                          took part in (int64;
                                                                          absent in older ones)
        S Y                                                    (m, numel) history ring
        rho                                                    (m,)
        gamma head count accepted rejected                     0-d, stored as (1,) + attr scalar=1
      /rng/...             the rank's RNG states (see ``rng``)

A run directory is assumed to belong to one job (``mlbfgs-train`` holds a lock on it, see
:mod:`mlbfgs_hpc.rundir`): stale ``.tmp-*`` directories are deleted by the next successful save.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..comm import LocalCommunicator
from ..naming import canonical_state_dict
from ..optimizer import MLBFGS
from .collective import check_comm, failure_of
from .errors import CheckpointError, CheckpointStorageError
from .h5io import fsync_path, open_h5, quote_key, sha256_file, write_tensor
from .layout import (
    CHECKPOINTS_DIRNAME,
    COMMON_NAME,
    FORMAT_NAME,
    LATEST_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    STEP_DIR_RE,
    TMP_DIR_RE,
    shard_name,
    step_dir_name,
    step_dirs,
)
from .manifest import (
    block_table,
    class_path,
    file_attrs,
    json_checked,
    json_text,
    model_table,
    optimizer_kind,
    package_versions,
)
from .rng import write_rng
from .tree import write_tree

logger = logging.getLogger(__name__)


#: Test seam: called by rank 0 with the temporary directory after every shard is written and
#: before the manifest is (fault-injection tests use it to kill a job mid-write).
_BEFORE_MANIFEST_HOOK: Callable[[Path], None] | None = None

def _visibility_wait_s() -> float:
    # The setting is mlbfgs_hpc.checkpoint.VISIBILITY_WAIT_S (documented there): read it from
    # the package at call time, so that assigning it there takes effect.
    from .. import checkpoint

    return float(checkpoint.VISIBILITY_WAIT_S)


def _write_shard(path: Path, *, optimizer: torch.optim.Optimizer, rank: int, world_size: int,
                 step: int, host: str) -> list[int]:
    owned: list[int] = []
    with open_h5(path, "w") as f:
        f.attrs.update({**file_attrs("shard", step=step, world_size=world_size),
                        "rank": rank, "host": host})
        blocks = f.create_group("blocks")
        if isinstance(optimizer, MLBFGS):
            for b in optimizer.owned_blocks:
                block = optimizer.blocks[b]
                group = blocks.create_group(f"{b:06d}")
                group.attrs.update({"name": block.name, "numel": block.numel,
                                    "param_names": json.dumps(list(block.param_names))})
                for key, tensor in optimizer.block_state(b).items():
                    write_tensor(group, key, tensor)
                owned.append(b)
        write_rng(f.create_group("rng"))
    return owned


def _write_common(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scheduler: Any, step: int, world_size: int) -> None:
    with open_h5(path, "w") as f:
        f.attrs.update(file_attrs("common", step=step, world_size=world_size))
        group = f.create_group("model")
        for name, value in canonical_state_dict(model).items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"model state entry {name!r} is a "
                                      f"{type(value).__name__}, not a tensor: not supported")
            write_tensor(group, quote_key(name), value)
        if isinstance(optimizer, MLBFGS):
            # Block state lives in the shards, written by each owner from block_state().
            state = optimizer.state_dict(include_blocks=False)
            del state["state"]
        else:
            state = optimizer.state_dict()
        group = f.create_group("optimizer")
        group.attrs.update({"kind": optimizer_kind(optimizer), "class": class_path(optimizer)})
        write_tree(group, state)
        if scheduler is not None:
            group = f.create_group("scheduler")
            group.attrs["class"] = class_path(scheduler)
            write_tree(group, scheduler.state_dict())


def save_checkpoint(run_dir: str | Path, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, comm: LocalCommunicator,
                    scheduler: Any = None, extra: dict[str, Any] | None = None,
                    config: dict[str, Any] | None = None, keep: int = 3) -> Path:
    """Write a checkpoint of ``step`` under ``run_dir/checkpoints`` (collective).

    Every rank must call it at the same point with the same arguments. The checkpoint is
    complete (manifest written, directory renamed, ``latest`` updated, old ones pruned) when
    the call returns on any rank.

    Args:
        run_dir: the run directory, on storage shared by all ranks.
        step: the training step (an integer >= 0); names the directory ``step-%06d``. An
            existing checkpoint of the same step is replaced.
        model: the model; rank 0 writes its ``state_dict()`` (parameters and buffers).
        optimizer: :class:`~mlbfgs_hpc.MLBFGS` (each rank writes the blocks it owns) or any
            ``torch.optim`` optimizer (replicated; rank 0 writes its ``state_dict()``).
        comm: the communicator (the optimizer's, for mL-BFGS).
        scheduler: an LR scheduler whose ``state_dict()`` is saved, or ``None``.
        extra: JSON values the caller needs to continue, e.g. the data-order position
            ``{"epoch": 3, "batch_index": 120}``. The keys ``elapsed_seconds`` (wall-clock
            time) and ``final`` (the run's last checkpoint) describe the run: ``diff``
            reports them as run metadata, not training state.
        config: JSON run configuration, stored in the manifest.
        keep: how many of the newest checkpoints to keep (an integer >= 1).

    Returns:
        The checkpoint directory (the same path on every rank).

    Raises:
        ValueError: an argument is out of range or ``extra``/``config`` is not JSON.
        CheckpointStorageError: the run directory is not visible on every rank (node-local
            storage) or cannot be created; the message names the host and the path.
        CheckpointError: writing failed on some rank (raised on every rank, naming it).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
    extra = json_checked("extra", extra)
    config = json_checked("config", config)
    check_comm(comm, optimizer)
    started = time.perf_counter()
    rank, size = comm.rank, comm.size
    root = Path(run_dir) / CHECKPOINTS_DIRNAME
    final = root / step_dir_name(step)

    # 1. Rank 0 creates the temporary directory; every rank must see it (shared storage).
    created: tuple[str | None, str | None] | None = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:12]}"
            tmp.mkdir()
            created = (str(tmp), None)
        except OSError as exc:
            created = (None, f"cannot create a checkpoint directory under {root} on host "
                             f"{comm.hostname}: {exc}")
    tmp_name, error = comm.broadcast_object(created)
    if error is not None:
        raise CheckpointStorageError(error)
    tmp = Path(tmp_name)
    deadline = time.monotonic() + _visibility_wait_s()
    while not tmp.is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    seen = comm.allgather_object((tmp.is_dir(), comm.hostname))
    blind = [f"rank {r} on host {host}" for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointStorageError(
            f"checkpoint directory {tmp}, created by rank 0 on host {seen[0][1]}, is not "
            f"visible to {', '.join(blind)}: the run directory must be on a file system "
            f"shared by all ranks (node-local scratch cannot hold a sharded checkpoint)")

    # 2. Every rank writes its shard (rank 0 also the common file), fsyncs and digests it.
    result: dict[str, Any] | None = None
    failure: tuple[str, str] | None = None
    try:
        shard = tmp / shard_name(rank, size)
        blocks = _write_shard(shard, optimizer=optimizer, rank=rank, world_size=size,
                              step=step, host=comm.hostname)
        fsync_path(shard)
        files = {shard.name: {"bytes": shard.stat().st_size, "sha256": sha256_file(shard)}}
        if rank == 0:
            common = tmp / COMMON_NAME
            _write_common(common, model=model, optimizer=optimizer, scheduler=scheduler,
                          step=step, world_size=size)
            fsync_path(common)
            files[COMMON_NAME] = {"bytes": common.stat().st_size, "sha256": sha256_file(common)}
        result = {"rank": rank, "host": comm.hostname, "blocks": blocks, "files": files}
    except Exception as exc:  # any failure must reach the other ranks instead of hanging them
        failure = failure_of(exc)
    gathered = comm.allgather_object((result, failure and (*failure, comm.hostname)))
    failed = [(r, f) for r, (_, f) in enumerate(gathered) if f is not None]
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        details = "; ".join(f"rank {r} (host {f[2]}): {f[1]}" for r, f in failed)
        raise CheckpointError(f"checkpoint of step {step} not written: {details}")

    # 3. Rank 0 checks, writes the manifest last, renames, points `latest`, prunes.
    outcome: tuple[str | None, str | None] | None = None
    if rank == 0:
        try:
            results = [r for r, _ in gathered]
            manifest = _finalize(tmp, final, results=results, step=step, model=model,
                                 optimizer=optimizer, scheduler=scheduler, extra=extra,
                                 config=config, world_size=size, keep=keep)
            total = sum(f["bytes"] for f in manifest["files"].values())
            logger.info("checkpoint step %d written to %s: %d files, %.1f MiB, %.2f s",
                        step, final, len(manifest["files"]), total / 2**20,
                        time.perf_counter() - started)
            outcome = (str(final), None)
        except Exception as exc:  # reported to every rank below
            shutil.rmtree(tmp, ignore_errors=True)
            outcome = (None, f"checkpoint of step {step} not completed: {failure_of(exc)[1]}")
    final_name, error = comm.broadcast_object(outcome)
    if error is not None:
        raise CheckpointError(error)
    return Path(final_name)


def _finalize(tmp: Path, final: Path, *, results: list[dict[str, Any]], step: int,
              model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
              extra: dict[str, Any], config: dict[str, Any], world_size: int,
              keep: int) -> dict[str, Any]:
    files: dict[str, dict[str, Any]] = {}
    for result in results:
        for name, info in result["files"].items():
            path = tmp / name
            # The other ranks' files must be visible here too, or the storage is not shared.
            if not path.is_file() or path.stat().st_size != info["bytes"]:
                raise CheckpointStorageError(
                    f"{path}, written by rank {result['rank']} on host {result['host']}, is "
                    f"not visible (or has another size) on rank 0's host: the run directory "
                    f"must be on a file system shared by all ranks")
            files[name] = {**info, "rank": result["rank"], "host": result["host"]}
    if _BEFORE_MANIFEST_HOOK is not None:
        _BEFORE_MANIFEST_HOOK(tmp)
    manifest: dict[str, Any] = {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "step": step,
        "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": package_versions(),
        "config": config,
        "extra": extra,
        "optimizer": {"kind": optimizer_kind(optimizer), "class": class_path(optimizer)},
        "scheduler": None if scheduler is None else class_path(scheduler),
        "model": model_table(model),
        "blocks": block_table(optimizer, world_size) if isinstance(optimizer, MLBFGS) else [],
        "shards": [{"rank": r["rank"], "host": r["host"], "file": shard_name(r["rank"],
                    world_size), "blocks": r["blocks"]} for r in results],
        "files": files,
    }
    if isinstance(optimizer, MLBFGS):
        manifest["optimizer"]["config"] = optimizer.config.to_dict()
    manifest_path = tmp / MANIFEST_NAME
    with manifest_path.open("w", encoding="utf-8") as fh:
        fh.write(json_text(manifest))
        fh.flush()
        os.fsync(fh.fileno())
    fsync_path(tmp, directory=True)
    root = final.parent
    replaced: Path | None = None
    if final.exists():
        # Same step written again (e.g. after a restart): move the old one aside first,
        # because a directory cannot be renamed onto a non-empty one.
        replaced = root / f".old-{final.name}-{uuid.uuid4().hex[:12]}"
        os.rename(final, replaced)
        logger.warning("replacing existing checkpoint %s", final)
    os.rename(tmp, final)
    fsync_path(root, directory=True)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    # The checkpoint is complete from here on: housekeeping failures only warn.
    try:
        pointer_tmp = root / f".{LATEST_NAME}.{uuid.uuid4().hex[:12]}"
        with pointer_tmp.open("w", encoding="utf-8") as fh:
            fh.write(final.name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(pointer_tmp, root / LATEST_NAME)
        fsync_path(root, directory=True)
        _prune(root, keep=keep, current=final)
    except OSError as exc:
        logger.warning("checkpoint %s is complete, but updating %s or pruning old "
                       "checkpoints failed: %s", final, root / LATEST_NAME, exc)
    return manifest


def _prune(root: Path, *, keep: int, current: Path) -> None:
    """Delete all but the ``keep`` newest checkpoints and leftovers of interrupted writes."""
    dirs = step_dirs(root)
    newer = [p.name for s, p in dirs if s > int(STEP_DIR_RE.match(current.name).group(1))]
    if newer:
        logger.warning("checkpoints with a later step than %s exist (%s): auto-resume "
                       "picks the newest step", current.name, ", ".join(newer))
    for _, path in dirs[keep:]:
        if path != current:
            logger.info("deleting old checkpoint %s (keep=%d)", path, keep)
            shutil.rmtree(path, ignore_errors=True)
    for path in root.iterdir():
        if path.is_dir() and TMP_DIR_RE.match(path.name):
            logger.info("deleting %s left by an interrupted checkpoint write", path)
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(f".{LATEST_NAME}."):
            path.unlink(missing_ok=True)
