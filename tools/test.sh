#!/usr/bin/env bash
# The README's test command (and CI's): set up (idempotent), then run the whole suite.
# Multi-rank tests start real mpirun/srun jobs; the SLURM and network-namespace tests start
# and stop their own services. Extra arguments go to pytest (e.g. `tools/test.sh -k ckpt`).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/tools/bootstrap.sh"
cd "$repo"
set +e
"${MLBFGS_VENV:-$repo/.venv}/bin/python" -m pytest -ra "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
  echo "tools/test.sh: pytest collected no tests: failing" >&2
  exit 1
fi
exit $status
