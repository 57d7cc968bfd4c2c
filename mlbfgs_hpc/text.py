"""Character-level language-model data from text every machine has: Python's own sources.

The corpus is the standard library that ships with the running interpreter (the top-level
``*.py`` modules of ``sysconfig.get_paths()["stdlib"]``: 168 files, 4.7 MB on CPython 3.11.7),
so no download is ever needed and compute nodes without network have it too. ``--data-root``
may name any other directory of ``*.py`` files.

Layout, fixed by the corpus and nothing else (never by the seed or the number of ranks)::

    files, sorted by name  ──  crc32(name) % 10 == 0 ?  ──yes──>  test split   (~10 % of files)
                                                         ──no───>  train split
    split text = its files joined by "\\n"  →  bytes  →  tokens (ASCII code; other bytes → 0)
    samples    = non-overlapping windows: x = tokens[i·L : i·L + L], y = tokens[i·L+1 : i·L+L+1]

Splitting by *file* (not by window) keeps the test text out of training: a module's
boilerplate never appears on both sides. The vocabulary is the 128 ASCII codes; the few
non-ASCII bytes (4e-5 of the corpus) map to code 0, which source text never uses otherwise.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sysconfig
import zlib
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

#: Token vocabulary: the ASCII codes.
VOCAB_SIZE = 128
#: Characters per sample (the model's context length).
DEFAULT_CONTEXT = 64
#: One file in this many goes to the test split.
_TEST_MODULUS = 10


def default_root() -> str:
    """The running interpreter's standard-library directory."""
    return sysconfig.get_paths()["stdlib"]


def source_files(root: str) -> list[Path]:
    """The ``*.py`` files directly in ``root``, sorted by name.

    Raises:
        FileNotFoundError: ``root`` is not a directory or holds no ``*.py`` file.
    """
    directory = Path(root)
    files = sorted(directory.glob("*.py")) if directory.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no *.py files in {root!r}: the python-stdlib dataset reads "
                                f"the top-level modules of a Python standard library "
                                f"(default {default_root()!r})")
    return files


def is_test_file(name: str) -> bool:
    """Whether file ``name`` belongs to the test split (a hash of the name alone)."""
    return zlib.crc32(name.encode("utf-8")) % _TEST_MODULUS == 0


@functools.lru_cache(maxsize=4)
def _split_tokens(root: str, split: str) -> tuple[np.ndarray, str]:
    files = [f for f in source_files(root) if is_test_file(f.name) == (split == "test")]
    raw = b"\n".join(f.read_bytes() for f in files)
    tokens = np.frombuffer(raw, dtype=np.uint8).copy()
    tokens[tokens >= VOCAB_SIZE] = 0
    digest = hashlib.sha256(raw).hexdigest()[:16]
    logger.debug("python-stdlib %s: %d files, %d characters, sha256 %s", split, len(files),
                 len(tokens), digest)
    tokens.flags.writeable = False
    return tokens, digest


def load_windows(split: str, *, root: str | None = None,
                 context: int = DEFAULT_CONTEXT) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of one split, as int64 ``(N, context)`` tensors.

    Args:
        split: ``"train"`` or ``"test"``.
        root: directory of ``*.py`` files (default: :func:`default_root`).
        context: characters per sample (>= 1).

    Raises:
        ValueError: bad ``split`` or ``context``, or a split too short for one window.
        FileNotFoundError: ``root`` holds no ``*.py`` file.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"context must be an integer >= 1, got {context!r}")
    tokens, _ = _split_tokens(str(root or default_root()), split)
    count = (len(tokens) - 1) // context
    if count < 1:
        raise ValueError(f"the {split} split of {root or default_root()!r} has "
                         f"{len(tokens)} characters: fewer than one window of {context} + 1")
    usable = torch.from_numpy(tokens[:count * context + 1].astype(np.int64))
    x = usable[:-1].view(count, context).clone()
    y = usable[1:].view(count, context).clone()
    return x, y


def corpus_digest(split: str, *, root: str | None = None) -> str:
    """First 16 hex digits of the sha256 of a split's text (identifies the corpus in logs)."""
    return _split_tokens(str(root or default_root()), split)[1]
