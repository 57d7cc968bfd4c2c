"""``tools/gpu_checks.py`` (the one-command GPU checks) run for real on the CPU: its plumbing,
its record of each section's exit code, the default run's parsed evaluations, its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "tools" / "gpu_checks.py"


def test_cpu_dry_run_records_every_section(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), "--device", "cpu", "--quick",
         "--only", "env,iteration,direct,default-run,lr-bar", "--seeds", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    # The GPU benchmark exits 2 without a GPU, so the whole run reports a failure.
    assert proc.returncode == 1, proc.stdout + proc.stderr
    res = json.loads((out / "gpu_checks.json").read_text())
    assert {name: sec["rc"] for name, sec in res["sections"].items()} == \
        {"env": 0, "iteration": 2, "direct": 0}
    assert "no GPU" in res["sections"]["env"]["tail"][-1]
    direct = json.loads((out / "direct.json").read_text())
    assert direct["device"] == "cpu"
    assert [row["numel"] for row in direct["direct"]] == [131072, 401536, 1048576, 2359296]
    assert sorted(res["runs"]) == ["default-seed0", "lr0.05-seed0", "lr0.2-seed0"]
    for run in res["runs"].values():
        assert run["rc"] == 0 and len(run["evals"]) == 3      # 30 steps, evaluated every 10
        assert run["final"] == run["evals"][-1] and run["best"] == max(run["evals"])
        assert run["drop"] == run["best"] - run["final"]
        assert 10.0 < run["final"] <= 100.0
    # Different lrs, different runs (the --lr reached the trainer).
    assert len({tuple(run["evals"]) for run in res["runs"].values()}) == 3
    summary = (out / "summary.md").read_text()
    assert "| iteration | 2 |" in summary and "| lr0.2-seed0 | 0 |" in summary
    log = (out / "sections.log").read_text()
    assert "===== run default-seed0: rc 0" in log and "no CUDA device" in log
    assert "--lr 0.05" in log and "--lr 0.2" in log
    assert sorted(p.name for p in out.iterdir()) == [
        "direct.json", "gpu_checks.json", "sections.log", "summary.md"]


def test_unknown_section_is_rejected(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path),
                           "--only", "env,nope"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 2 and "unknown sections ['nope']" in proc.stderr


def test_a_section_past_its_timeout_is_recorded_with_its_output(tmp_path: Path) -> None:
    from tools import gpu_checks

    log = tmp_path / "sections.log"
    sec = gpu_checks._run("sleeper", [sys.executable, "-c",
                                      "print('started'); import time; time.sleep(60)"],
                          timeout=3, log=log)
    assert sec["rc"] == 124 and sec["seconds"] < 30
    text = log.read_text()
    assert "===== sleeper: rc 124" in text and "started" in text
    assert "[timed out after 3 s]" in text
