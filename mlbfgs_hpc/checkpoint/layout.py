"""Names and places on disk: the run directory's ``checkpoints/``, ``step-NNNNNN``
directories, shard file names, the ``latest`` pointer and the schema constants.

::

    RUN/checkpoints/
      latest                         text file: the name of the newest complete checkpoint
      step-000100/
        manifest.json                written LAST by rank 0: a directory without it is incomplete
        common.h5                    rank 0: model, optimizer common state, LR scheduler
        shard-00000-of-00004.h5      rank 0: its RNG states and the mL-BFGS blocks it owns
        shard-00001-of-00004.h5      rank 1: ...
      step-000200/ ...
      .tmp-step-000300-1f2e3d4c5b6a  a write in progress (or killed): never read, removed later
"""

from __future__ import annotations

import re
from pathlib import Path

from ..curvature import CURVATURE_STATE_KEYS
from ..optimizer import FLAT_STATE_KEYS

#: Version of the on-disk layout described in the module docstring.
SCHEMA_VERSION = 1
FORMAT_NAME = "mlbfgs-hpc-checkpoint"
MANIFEST_NAME = "manifest.json"
COMMON_NAME = "common.h5"
LATEST_NAME = "latest"
CHECKPOINTS_DIRNAME = "checkpoints"
#: Per-block datasets every shard must hold for an mL-BFGS block.
BLOCK_STATE_KEYS: tuple[str, ...] = (*FLAT_STATE_KEYS, *CURVATURE_STATE_KEYS)

STEP_DIR_RE = re.compile(r"^step-(\d{6,})$")
TMP_DIR_RE = re.compile(r"^\.(?:tmp|old)-step-(\d{6,})-[0-9a-f]+$")
# ---- paths -------------------------------------------------------------------------------------
def step_dir_name(step: int) -> str:
    """Directory name of the checkpoint of ``step`` (``step-000100``)."""
    return f"step-{step:06d}"


def shard_name(rank: int, world_size: int) -> str:
    """File name of ``rank``'s shard (``shard-00001-of-00004.h5``)."""
    return f"shard-{rank:05d}-of-{world_size:05d}.h5"


def checkpoints_dir(run_dir: str | Path) -> Path:
    """Where the checkpoints of ``run_dir`` live: ``run_dir/checkpoints``, or ``run_dir``
    itself when it already is such a directory (holds ``step-*`` entries or ``latest``)."""
    run_dir = Path(run_dir)
    nested = run_dir / CHECKPOINTS_DIRNAME
    if nested.is_dir():
        return nested
    if run_dir.is_dir() and ((run_dir / LATEST_NAME).exists() or any(
            STEP_DIR_RE.match(p.name) or TMP_DIR_RE.match(p.name) for p in run_dir.iterdir())):
        return run_dir
    return nested


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete-looking checkpoint directories under ``root``, newest step first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_DIR_RE.match(p.name))]
    return sorted(found, key=lambda item: item[0], reverse=True)


def read_latest_pointer(run_dir: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names (it may since have been damaged)."""
    pointer = checkpoints_dir(run_dir) / LATEST_NAME
    try:
        name = pointer.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return pointer.parent / name if STEP_DIR_RE.match(name) else None


def is_checkpoint_dir(path: str | Path) -> bool:
    """True for a checkpoint directory (a ``step-*`` directory or one holding a manifest)."""
    path = Path(path)
    return path.is_dir() and (bool(STEP_DIR_RE.match(path.name)) or
                              (path / MANIFEST_NAME).exists())
