"""Smoke test: the selection benchmark runs end to end in --quick mode (no timing assertions).

It runs as `python -m benchmarks.selection` from the repository root, as on a GPU machine that
has the checkout but no install of the project.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_selection_benchmark_quick_runs():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.selection", "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout.splitlines()
    assert any(line.startswith("machine:") for line in out)
    assert any(line.startswith("targets missed:") for line in out)  # timings: no verdict asserted

    # Dispatch table: both backends; Triton's count does not depend on K.
    rows = {
        (r.split()[0], r.split()[1]): r.split()[2::2]
        for r in out
        if r.split()[:1] in (["torch"], ["triton"])
    }
    assert set(rows) == {("torch", "1"), ("torch", "8"), ("triton", "1"), ("triton", "8")}
    assert rows["triton", "1"][0] == rows["triton", "1"][1]
    assert int(rows["torch", "1"][1]) > int(rows["torch", "1"][0])  # the torch loop grows with K

    # CPU overhead table (per image) and the batched table, with the targets verdicts.
    cpu = [line.split() for line in out if line.split()[:1] in (["576"], ["2880"])]
    assert [(r[0], r[1]) for r in cpu] == [
        ("576", "16"),
        ("576", "64"),
        ("2880", "16"),
        ("2880", "64"),
    ]
    assert cpu[0][-1] == "-" and all(r[-1] in ("PASS", "MISS") for r in cpu[1:])
    batched = [line.split() for line in out if line.split()[1:2] == ["576"]]
    assert [(r[0], r[2]) for r in batched] == [("1", "16"), ("1", "64"), ("2", "16"), ("2", "64")]
    assert all(r[6] == "yes" for r in batched)
    assert "corpus on cpu: 20/20 cases pick identically" in out


def test_qwen3_vl_importance_measurement_runs(tmp_path):
    """The measurement behind docs/qwen3_vl.md, on two images: every candidate row, and the
    default compared with itself agrees fully (the table is not made up)."""
    from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl

    model = write_tiny_qwen3_vl(tmp_path / "tiny-qwen3-vl")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.qwen3_vl_importance", "--model", str(model),
         "--images", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in done.stdout.splitlines()
            if line.startswith("| ") and "---" not in line and "source" not in line}
    assert [v.strip() for v in rows["attention, block 3"][:4]] == ["1.00"] * 4
    assert {"post-merger L2 norm", "DeepStack level 0 L2 norm", "attention, block 0"} <= set(rows)
