"""The one entry point of the benchmarks: ``python -m tools.bench [COMMAND] [ARGS]``.

Without a command (or with options only) it runs the CPU harness (:mod:`.harness`); the
commands ``gpu``, ``multinode`` and ``checkpoint`` run those stand-alone benchmarks with their
own options (``python -m tools.bench gpu --help``). ``python tools/bench ...`` works as well.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

#: Stand-alone benchmarks: command -> module (each has ``main(argv) -> int``).
COMMANDS: dict[str, str] = {"gpu": "gpu", "multinode": "multinode", "checkpoint": "checkpoint",
                            "batched": "batched",
                            "netpaths": "netpaths", "alphabeta": "alphabeta", "rsblock": "rsblock"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    package = __package__ or "tools.bench"
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(f"{package}.{COMMANDS[argv[0]]}")
        return int(module.main(argv[1:]))
    harness = importlib.import_module(f"{package}.harness")
    return int(harness.main(argv))


if __name__ == "__main__":
    if not __package__:  # python tools/bench: make the repository root importable
        sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.exit(main())
