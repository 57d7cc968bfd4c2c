"""One seed for every random number generator a run uses, and a checkpoint saves.

``mlbfgs-train --seed S`` calls :func:`seed_everything` with ``S`` on **every rank alike**:
torch's CPU generator, the generator of every CUDA device, numpy's legacy global generator
(``np.random.*``) and Python's ``random``. The same seed on every rank is what the rest of
the design relies on: the initial weights are identical on all ranks, and the data order
(drawn from its own ``torch.Generator`` seeded with ``S``) does not depend on the number of
ranks. Two runs with the same flags and seed therefore start every generator in the same
state, so user code that draws from numpy or ``random`` (augmentation, sampling) is
reproducible from the seed, and a checkpoint's RNG states (``mlbfgs-ckpt diff --rng``) agree.

Code that wants a different stream on each rank derives it explicitly, e.g.
``np.random.default_rng([seed, rank])``; :func:`seed_everything` takes ``rank_offset`` for
callers who prefer to shift the global generators instead.
"""

from __future__ import annotations

import random

import numpy as np
import torch

__all__ = ["seed_everything", "MAX_SEED"]

#: numpy's legacy generator takes seeds below 2**32.
MAX_SEED = 2**32 - 1


def seed_everything(seed: int, *, rank_offset: int = 0) -> None:
    """Seed torch (CPU and every CUDA device), numpy's global generator and ``random``.

    Args:
        seed: an integer in [0, 2**32).
        rank_offset: added to ``seed`` (e.g. the rank, for per-rank streams); the sum must
            stay in [0, 2**32). ``mlbfgs-train`` uses 0 on every rank.

    Raises:
        ValueError: the seed (plus offset) is not an integer in [0, 2**32).
    """
    value = seed + rank_offset if isinstance(seed, int) and isinstance(rank_offset, int) \
        else None
    if value is None or isinstance(seed, bool) or not 0 <= value <= MAX_SEED:
        raise ValueError(f"seed (+ rank_offset) must be an integer in [0, 2**32), got "
                         f"{seed!r} + {rank_offset!r}")
    torch.manual_seed(value)  # also seeds every CUDA device (lazily, if CUDA is initialised later)
    np.random.seed(value)
    random.seed(value)
