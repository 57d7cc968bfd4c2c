"""The checkpoint errors: every failure is a :class:`CheckpointError` naming the file, the
entry or the host, raised on every rank of a collective call."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointCorruptError", "CheckpointMismatchError",
           "CheckpointSchemaError", "CheckpointStorageError", "ERROR_CLASSES"]


class CheckpointError(Exception):
    """A checkpoint could not be written or read; the message names the file or the entry."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or fails its sha256 or fletcher32 check."""


class CheckpointMismatchError(CheckpointError):
    """The model or optimizer does not match what the checkpoint was written from."""


class CheckpointSchemaError(CheckpointError):
    """The manifest is not a checkpoint manifest this version understands."""


class CheckpointStorageError(CheckpointError):
    """The run directory is not shared by all ranks, or could not be written."""


ERROR_CLASSES: dict[str, type[CheckpointError]] = {
    cls.__name__: cls for cls in (CheckpointError, CheckpointCorruptError,
                                  CheckpointMismatchError, CheckpointSchemaError,
                                  CheckpointStorageError)}
