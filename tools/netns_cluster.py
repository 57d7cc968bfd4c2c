"""``python tools/netns_cluster.py``: the command line of the namespace test cluster.

The code lives in the package ``tools/netns/`` (see its docstring); this script only makes
the repository importable and runs :func:`tools.netns.cli.main`.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.netns.cli import main

    sys.exit(main())
