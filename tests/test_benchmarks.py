"""Smoke test: the selection benchmark runs end to end in --quick mode (no timing assertions)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "selection.py"


def test_selection_benchmark_quick_runs():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    header = next(line for line in out.splitlines() if line.startswith("device"))
    assert header.split()[:5] == ["device", "N", "K", "select_ms", "encoder_ms"]
    assert "machine:" in out and "targets missed:" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("cpu ")]
    assert [(r[1], r[2]) for r in rows] == [
        ("576", "16"),
        ("576", "64"),
        ("2880", "16"),
        ("2880", "64"),
    ]
    assert any(r[-1] in ("PASS", "MISS") for r in rows)
