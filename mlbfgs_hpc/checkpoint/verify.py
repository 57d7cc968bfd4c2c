"""Listing and verifying checkpoints: digests, every dataset's fletcher32 checksum and the
block/model tables against the manifest; one checkpoint (:func:`verify_checkpoint`), every
checkpoint of a run (:func:`verify_run`, which also says which one a resume would use) or one
shard file (:func:`verify_file`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from .errors import CheckpointError
from .h5io import open_h5, quote_key, read_array, stored_shape
from .layout import (
    BLOCK_STATE_KEYS,
    COMMON_NAME,
    FORMAT_NAME,
    MANIFEST_NAME,
    TMP_DIR_RE,
    checkpoints_dir,
    read_latest_pointer,
    step_dirs,
)
from .manifest import (
    check_file,
    digest_problems,
    find_latest_valid,
    read_manifest,
    resolve_checkpoint,
)


@dataclass(frozen=True, kw_only=True)
class CheckpointInfo:
    """One entry of :func:`list_checkpoints`.

    Attributes:
        path: the checkpoint directory.
        step: its step (from the manifest, or from the directory name when unreadable).
        world_size: ranks that wrote it, ``None`` when the manifest is unreadable.
        bytes: total size of its files on disk.
        valid: digests and manifest check out; ``None`` when not checked.
        complete: ``False`` for a ``.tmp-*`` directory left by an interrupted write.
        latest: the ``latest`` pointer names it.
        problems: why it is not valid.
    """

    path: Path
    step: int
    world_size: int | None
    bytes: int
    valid: bool | None
    complete: bool = True
    latest: bool = False
    problems: tuple[str, ...] = ()


def list_checkpoints(run_dir: str | Path, *, check: bool = True,
                     include_incomplete: bool = False) -> list[CheckpointInfo]:
    """The checkpoints of ``run_dir``, oldest step first.

    Args:
        run_dir: a run directory or its ``checkpoints`` directory.
        check: verify manifests and sha256 digests (reads every file).
        include_incomplete: also list ``.tmp-*`` directories of interrupted writes.
    """
    root = checkpoints_dir(run_dir)
    latest = read_latest_pointer(run_dir)
    infos: list[CheckpointInfo] = []
    for step, path in reversed(step_dirs(root)):
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
        if check:
            manifest, problems = digest_problems(path)
        else:
            try:
                manifest, problems = read_manifest(path), []
            except CheckpointError as exc:
                manifest, problems = None, [str(exc)]
        infos.append(CheckpointInfo(
            path=path, step=manifest["step"] if manifest else step,
            world_size=manifest["world_size"] if manifest else None, bytes=size,
            valid=(not problems) if check or problems else None, latest=path == latest,
            problems=tuple(problems)))
    if include_incomplete and root.is_dir():
        for path in sorted(root.iterdir()):
            if path.is_dir() and (m := TMP_DIR_RE.match(path.name)):
                infos.append(CheckpointInfo(
                    path=path, step=int(m.group(1)), world_size=None,
                    bytes=sum(p.stat().st_size for p in path.iterdir() if p.is_file()),
                    valid=False, complete=False,
                    problems=("incomplete: left by an interrupted checkpoint write",)))
    return infos


def verify_checkpoint(path: str | Path) -> list[str]:
    """Every problem of a checkpoint; empty when it is valid.

    Checks the manifest and schema, every file's size and sha256, reads every dataset (which
    verifies its fletcher32 checksum) and checks that every block of the block table and every
    model entry is present with the recorded shape. ``path`` may be a run directory: its
    newest valid checkpoint is verified (:func:`verify_run` checks all of them).
    """
    try:
        ckpt = resolve_checkpoint(path)
    except CheckpointError as exc:
        return [str(exc)]
    manifest, problems = digest_problems(ckpt)
    if manifest is None:
        return problems
    for name in sorted(manifest["files"]):
        if (ckpt / name).is_file():
            problems += _content_problems(ckpt / name, manifest)
    return problems


@dataclass(frozen=True, kw_only=True)
class CheckpointReport:
    """One checkpoint of a run as :func:`verify_run` found it.

    Attributes:
        path: the checkpoint directory (or ``.tmp-*`` directory of an interrupted write).
        step: its step.
        complete: ``False`` for an interrupted write (not damage: resume ignores it and the
            next checkpoint removes it).
        problems: why it is damaged; empty when it is valid.
    """

    path: Path
    step: int
    complete: bool = True
    problems: tuple[str, ...] = ()

    @property
    def damaged(self) -> bool:
        return self.complete and bool(self.problems)


@dataclass(frozen=True, kw_only=True)
class RunVerification:
    """The outcome of :func:`verify_run`.

    Attributes:
        run_dir: the directory that was checked.
        checkpoints: every checkpoint, oldest step first, then interrupted writes.
        resume_from: the checkpoint a resume would load (newest step whose digests check
            out), ``None`` when there is none.
    """

    run_dir: Path
    checkpoints: tuple[CheckpointReport, ...]
    resume_from: Path | None

    @property
    def damaged(self) -> list[CheckpointReport]:
        return [c for c in self.checkpoints if c.damaged]

    @property
    def ok(self) -> bool:
        """At least one complete checkpoint, and none damaged."""
        return any(c.complete for c in self.checkpoints) and not self.damaged


def verify_run(run_dir: str | Path) -> RunVerification:
    """Verify every checkpoint of a run directory (:func:`verify_checkpoint` on each).

    Raises:
        CheckpointError: ``run_dir`` is not a directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    reports = [CheckpointReport(path=path, step=step, problems=tuple(verify_checkpoint(path)))
               for step, path in reversed(step_dirs(checkpoints_dir(run_dir)))]
    reports += [CheckpointReport(path=info.path, step=info.step, complete=False,
                                 problems=info.problems)
                for info in list_checkpoints(run_dir, check=False, include_incomplete=True)
                if not info.complete]
    return RunVerification(run_dir=run_dir, checkpoints=tuple(reports),
                           resume_from=find_latest_valid(run_dir))


def verify_file(path: str | Path) -> list[str]:
    """Every problem of one file of a checkpoint (a shard or ``common.h5``); empty if valid.

    Every dataset is read (fletcher32); with the checkpoint's manifest beside it, the size,
    sha256 and content are also checked against the manifest. A file without its manifest
    (copied elsewhere) is checked for what it holds alone, which the result says.
    """
    path = Path(path)
    if not path.is_file():
        return [f"{path} does not exist or is not a file"]
    if not (path.parent / MANIFEST_NAME).exists():
        return _content_problems(path, None)
    try:
        manifest = read_manifest(path.parent)
    except CheckpointError as exc:
        return [str(exc)] + _content_problems(path, None)
    info = manifest["files"].get(path.name)
    if info is None:
        return [f"{path} is not listed in {path.parent / MANIFEST_NAME}"]
    problem = check_file(path.parent, path.name, info)
    return ([problem] if problem else []) + _content_problems(path, manifest)


def _content_problems(file: Path, manifest: dict[str, Any] | None) -> list[str]:
    """Unreadable datasets of one HDF5 file, and (with a manifest) what it lacks."""
    try:
        with open_h5(file) as f:
            if f.attrs.get("format") != FORMAT_NAME:
                return [f"{file} is not an {FORMAT_NAME} file"]
            problems = _dataset_problems(f)
            if manifest is not None:
                problems += _structure_problems(f, file.name, manifest)
            return problems
    except (OSError, ValueError) as exc:
        return [f"{file} cannot be opened as HDF5: {exc}"]


def _dataset_problems(f: h5py.File) -> list[str]:
    problems: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            try:
                read_array(obj)
            except CheckpointError as exc:
                problems.append(str(exc))

    f.visititems(visit)
    return problems


def _structure_problems(f: h5py.File, name: str, manifest: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    where = f.filename
    if f.attrs.get("step") != manifest["step"] or \
            f.attrs.get("world_size") != manifest["world_size"]:
        problems.append(f"{where}: step/world_size attributes disagree with the manifest")
    if name == COMMON_NAME:
        for entry in manifest["model"]:
            key = f"model/{quote_key(entry['name'])}"
            if key not in f:
                problems.append(f"{where}: model entry {entry['name']} is missing")
            elif stored_shape(f[key]) != tuple(entry["shape"]):
                problems.append(f"{where}: model entry {entry['name']} has shape "
                                f"{stored_shape(f[key])}, the manifest says {entry['shape']}")
        return problems
    for block in manifest["blocks"]:
        if block["shard"] != name:
            continue
        group = f.get(f"blocks/{block['index']:06d}")
        if group is None:
            problems.append(f"{where}: block {block['index']} ({block['name']}) is missing")
            continue
        missing = [key for key in BLOCK_STATE_KEYS if key not in group]
        if missing:
            problems.append(f"{where}: block {block['index']} lacks {missing}")
        elif stored_shape(group["m_param"]) != (block["numel"],):
            problems.append(f"{where}: block {block['index']} has {group['m_param'].shape[0]} "
                            f"elements, the manifest says {block['numel']}")
    return problems
