"""The README's main command works: the demo builds the tiny model, serves it, reports savings."""

from __future__ import annotations

import subprocess
import sys

import pytest

from devtools.launch import free_port

pytestmark = pytest.mark.engine


def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "devtools.demo", "--no-keep-running", "--port", str(free_port()),
         "--model-dir", str(tmp_path / "tiny-llava")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "16/576" in proc.stdout and "576/576" in proc.stdout
    assert "saved 560 of 576 visual tokens (97.2%)" in proc.stdout
    assert "after a warm-up request at that budget" in proc.stdout
