"""Sharded HDF5 checkpoints: atomic, checksummed, pickle-free, resumable on any world size.

This package is the only code that talks to HDF5 (``h5py``). One checkpoint is one
directory under ``RUN/checkpoints/``: a ``manifest.json`` written last by rank 0, a
``common.h5`` (model, optimizer common state, LR scheduler) and one
``shard-RRRRR-of-WWWWW.h5`` per rank (its RNG states and the mL-BFGS blocks it owns). No
pickle anywhere: loading reads numbers and JSON, never executes code.

The parts, one module each (read them in this order):

==============  =================================================================================
``layout``      names and places on disk: ``checkpoints/``, ``step-NNNNNN``, shard names,
                ``latest``, the schema version
``errors``      :class:`CheckpointError` and its subclasses
``h5io``        HDF5 primitives: chunked, fletcher32-checked datasets, dtypes, fsync, sha256
``tree``        nested state (optimizer/scheduler state dicts) as a JSON skeleton + datasets
``rng``         the per-rank torch/CUDA/numpy/python RNG states (:class:`RngState`)
``manifest``    what ``manifest.json`` holds, checking files against it, and
                :func:`find_latest_valid` / :func:`resolve_checkpoint`
``collective``  one rank's failure raised as the same error on every rank
``write``       :func:`save_checkpoint` and its crash-safe protocol (tmp dir, fsync, rename)
``reader``      :class:`CheckpointReader`: read-only access to one checkpoint
``load``        :func:`load_checkpoint` / :func:`resume` on any world size (re-partitioning)
``verify``      :func:`list_checkpoints`, :func:`verify_checkpoint`, :func:`verify_run` (every
                checkpoint of a run, and which one a resume would use), :func:`verify_file`
``diff``        :func:`compare_checkpoints` / :func:`diff_checkpoints`: the training state
                compared (bitwise or ``numpy.allclose`` tolerances), run metadata apart
``summary``     :func:`checkpoint_summary` and :func:`model_state_dict` (``mlbfgs-ckpt``)
==============  =================================================================================

Everything a user needs is importable from here (``from mlbfgs_hpc.checkpoint import
save_checkpoint, resume``); the modules' other names are internal.
"""

from __future__ import annotations

from .diff import CheckpointDiff, compare_checkpoints, diff_checkpoints
from .errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointSchemaError,
    CheckpointStorageError,
)
from .layout import (
    SCHEMA_VERSION,
    checkpoints_dir,
    is_checkpoint_dir,
    read_latest_pointer,
    shard_name,
    step_dir_name,
)
from .load import LoadedCheckpoint, load_checkpoint, resume
from .manifest import find_latest_valid, read_manifest, resolve_checkpoint
from .reader import CheckpointReader
from .rng import RngState
from .summary import checkpoint_summary, model_state_dict
from .verify import (
    CheckpointInfo,
    CheckpointReport,
    RunVerification,
    list_checkpoints,
    verify_checkpoint,
    verify_file,
    verify_run,
)
from .write import save_checkpoint

__all__ = [
    "SCHEMA_VERSION", "CheckpointError", "CheckpointCorruptError", "CheckpointMismatchError",
    "CheckpointSchemaError", "CheckpointStorageError", "CheckpointInfo", "LoadedCheckpoint",
    "CheckpointReader", "save_checkpoint", "load_checkpoint", "resume", "find_latest_valid",
    "list_checkpoints", "verify_checkpoint", "resolve_checkpoint", "diff_checkpoints",
    "read_latest_pointer", "read_manifest", "checkpoint_summary", "model_state_dict",
    "checkpoints_dir", "is_checkpoint_dir", "step_dir_name", "shard_name", "RngState",
    "VISIBILITY_WAIT_S", "CheckpointDiff", "compare_checkpoints", "verify_run", "verify_file",
    "RunVerification", "CheckpointReport",
]

#: How long each rank polls for the temporary directory rank 0 created before concluding that
#: the run directory is not on shared storage (metadata of shared file systems can lag).
VISIBILITY_WAIT_S = 5.0
