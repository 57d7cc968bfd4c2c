"""tools/bootstrap.sh, the set-up both README commands run: one at a time per environment."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_concurrent_bootstrap_waits_for_the_running_one() -> None:
    """A bootstrap started while another holds the environment's lock waits (and says so),
    then finishes normally once the lock is released: two `tools/train.sh` side by side
    must not both run `pip install` into one environment."""
    venv = Path(sys.prefix)
    env = {**os.environ, "MLBFGS_VENV": str(venv), "MLBFGS_SKIP_APT": "1"}
    with open(f"{venv}.bootstrap.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        proc = subprocess.Popen([str(REPO / "tools" / "bootstrap.sh")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(3.0)
            assert proc.poll() is None, "bootstrap did not wait for the lock holder"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "waiting for another bootstrap" in err
    assert "ready" in err
