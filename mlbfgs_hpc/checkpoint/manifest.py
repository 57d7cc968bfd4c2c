"""The manifest: what ``manifest.json`` holds, reading and checking it against the files,
and picking the newest checkpoint of a run whose files check out.

``manifest.json`` (JSON, for humans and tools like ``jq``) holds the schema version,
package/torch/h5py versions, the run configuration and ``extra`` (data-order position) given
by the caller, the model table (name, shape, dtype, parameter or buffer), the block table
(names, parameter names and shapes, owning rank and shard file), per file its size and
**sha256**, the step and the world size. Rank 0 writes it last: a directory without it is
incomplete.

Auto-resume (:func:`find_latest_valid`) scans ``step-*`` directories newest step first and
skips, with a warning, any whose files do not match their digests. The ``latest`` pointer is
for people and shell scripts; auto-resume does not trust it, because a pointer cannot tell
that its target was damaged later.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from ..naming import canonical_name, canonical_state_dict, unwrap_model
from ..optimizer import MLBFGS
from .errors import CheckpointCorruptError, CheckpointError, CheckpointSchemaError
from .h5io import sha256_file
from .layout import (
    COMMON_NAME,
    FORMAT_NAME,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    TMP_DIR_RE,
    checkpoints_dir,
    is_checkpoint_dir,
    shard_name,
    step_dirs,
)

logger = logging.getLogger(__name__)


def model_table(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Name (canonical, :mod:`mlbfgs_hpc.naming`), shape, dtype and kind of every entry of
    the model's state dict."""
    params = {canonical_name(name) for name, _ in unwrap_model(model).named_parameters()}
    return [{"name": name, "shape": list(value.shape), "dtype": str(value.dtype).removeprefix(
        "torch."), "kind": "parameter" if name in params else "buffer"}
        for name, value in canonical_state_dict(model).items()
        if isinstance(value, torch.Tensor)]


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str:
    return "mlbfgs" if isinstance(optimizer, MLBFGS) else "torch"


def class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def block_table(optimizer: MLBFGS, world_size: int) -> list[dict[str, Any]]:
    owner = optimizer.ownership.owner
    return [{"index": b, "name": block.name, "param_names": list(block.param_names),
             "shapes": [list(s) for s in block.shapes], "numel": block.numel,
             "rank": owner[b], "shard": shard_name(owner[b], world_size)}
            for b, block in enumerate(optimizer.blocks)]


def file_attrs(kind: str, *, step: int, world_size: int) -> dict[str, Any]:
    return {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "kind": kind,
            "step": step, "world_size": world_size}


def json_checked(name: str, value: dict[str, Any] | None) -> dict[str, Any]:
    value = {} if value is None else value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of JSON values or None, got "
                         f"{type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must hold only JSON values (finite numbers, strings, bools, "
                         f"None, lists, dicts with string keys): {exc}") from exc


def package_versions() -> dict[str, str]:
    import platform

    from .. import __version__  # lazily: the package may import this module during init

    return {"mlbfgs_hpc": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            "python": platform.python_version()}


def json_text(value: Any, indent: str = "") -> str:
    """Indented JSON with short nested values (shapes, table rows) kept on one line."""
    inner = indent + "  "
    compact = json.dumps(value, allow_nan=False)
    if indent and len(compact) <= 96:
        return compact
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {json_text(v, inner).strip()}"
                 for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}" + ("\n" if not indent else "")
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = [f"{inner}{json_text(v, inner).strip()}" for v in value]
        return "[\n" + ",\n".join(items) + f"\n{indent}]"
    return json.dumps(value, allow_nan=False)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path``, schema-checked.

    Raises:
        CheckpointCorruptError: the manifest is missing or not valid JSON.
        CheckpointSchemaError: it is not a checkpoint manifest of a known schema version.
    """
    file = Path(path) / MANIFEST_NAME
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointCorruptError(
            f"{file} is missing: {path} is not a complete checkpoint") from None
    except OSError as exc:
        raise CheckpointCorruptError(f"{file} cannot be read: {exc}") from exc
    try:
        manifest = json.loads(text)
    except ValueError as exc:
        raise CheckpointCorruptError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointSchemaError(f"{file} is not an {FORMAT_NAME} manifest")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise CheckpointSchemaError(
            f"{file}: unsupported checkpoint schema version {version!r}; this mlbfgs-hpc "
            f"reads schema version {SCHEMA_VERSION}")
    for key in ("step", "world_size", "files", "shards", "model", "blocks", "optimizer"):
        if key not in manifest:
            raise CheckpointSchemaError(f"{file} lacks the field {key!r}")
    return manifest


def check_file(ckpt: Path, name: str, info: Mapping[str, Any], *,
               digest: bool = True) -> str | None:
    """Why file ``name`` of a checkpoint fails its manifest entry, or ``None``."""
    path = ckpt / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as exc:
        return f"{path} cannot be read: {exc}"
    if size != info.get("bytes"):
        return f"{path} has {size} bytes, the manifest says {info.get('bytes')} (truncated?)"
    if digest and sha256_file(path) != info.get("sha256"):
        return f"{path} fails its sha256 check (corrupt)"
    return None


def digest_problems(ckpt: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError as exc:
        return None, [str(exc)]
    expected = {COMMON_NAME} | {shard_name(r, manifest["world_size"])
                                for r in range(manifest["world_size"])}
    problems = [f"{ckpt / name} is not listed in the manifest"
                for name in sorted(expected - set(manifest["files"]))]
    problems += [p for name, info in sorted(manifest["files"].items())
                 if (p := check_file(ckpt, name, info)) is not None]
    return manifest, problems


def find_latest_valid(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` whose manifest and file digests check out.

    Damaged or incomplete newer checkpoints are skipped with a warning naming the problem.
    Not collective: :func:`resume` calls it on rank 0 and broadcasts the answer.
    """
    for step, path in step_dirs(checkpoints_dir(run_dir)):
        _, problems = digest_problems(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s (step %d): %s; falling back to an older one",
                       path, step, "; ".join(problems))
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; a run directory: its newest valid checkpoint.

    Raises:
        CheckpointError: ``path`` does not exist or holds no valid checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if is_checkpoint_dir(path):
        return path
    if TMP_DIR_RE.match(path.name):
        raise CheckpointCorruptError(
            f"{path} is the temporary directory of an interrupted checkpoint write; "
            f"it is incomplete and cannot be loaded")
    latest = find_latest_valid(path)
    if latest is None:
        raise CheckpointError(f"no valid checkpoint found under {path}")
    return latest
