#!/usr/bin/env bash
# The README's main command: set up (idempotent, seconds once done), then train.
# With no arguments: the embedded default, a short single-process Fashion-MNIST run.
# Any arguments go to mlbfgs-train (see `tools/train.sh --help`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/bootstrap.sh"
cd "$repo"
exec "${MLBFGS_VENV:-$repo/.venv}/bin/mlbfgs-train" "$@"
