"""``python -m mlbfgs_hpc`` is ``mlbfgs-train``."""

from __future__ import annotations

import sys

from .train import main

sys.exit(main())
