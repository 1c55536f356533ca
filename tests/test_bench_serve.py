"""The serving benchmark runs end to end against a tiny-model server it starts itself.

Tiny counts, two budgets, concurrency 2: checks the outputs exist and are well formed (the tiny
model's timings mean nothing, so nothing is asserted about them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "benchmarks.serve"]  # run from the checkout, as documented


def test_serving_benchmark_writes_json_plot_and_table(tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [*COMMAND, "--start", str(tiny_model_dir), "--budgets", "full,16",
         "--requests-per-budget", "2", "--concurrency", "2", "--max-tokens", "3",
         "--seed", "7", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # progress on stderr, one line per wave: (1 warm-up + 1 measured round) x 2 budgets
    assert done.stderr.count("[wave ") == 4
    header = next(line for line in done.stdout.splitlines() if line.lstrip().startswith("budget"))
    assert header.split()[:4] == ["budget", "kept", "prompt", "n"]
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in ("full", "16")}
    assert rows["full"][1] == "576" and rows["16"][1] == "16"

    report = json.loads((out / "serve.json").read_text())
    png = (out / "serve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "server.log").exists()

    assert report["settings"]["budgets"] == ["full", "16"]
    assert report["settings"]["concurrency"] == 2
    assert report["settings"]["seed"] == 7
    assert report["server"]["started_by_benchmark"] is True
    assert report["server"]["flops_model"]["vision"]["layers_run"] == 2  # the tiny tower
    for key in ("nproc", "cpu_model", "ram_gib"):
        assert report["machine"][key]

    full, pruned = report["budgets"]
    assert (full["budget"], pruned["budget"]) == ("full", "16")
    for row in (full, pruned):
        assert row["requests"] == 2 and row["errors"] == 0
        assert row["output_tokens_mean"] == 3  # ignore_eos: exactly max_tokens
        for key in ("ttft_s", "e2e_s"):
            assert 0 < row[key]["p50"] <= row[key]["p99"]
        assert row["ttft_s"]["p50"] <= row["e2e_s"]["p99"]
        assert row["request_throughput_rps"] > 0 and row["output_tokens_per_s"] > 0
        assert row["predicted_ttft_speedup"] > 0 and row["measured_over_predicted"] > 0
    assert full["visual_tokens_kept_mean"] == 576 and pruned["visual_tokens_kept_mean"] == 16
    assert full["prompt_tokens_mean"] - pruned["prompt_tokens_mean"] == 560
    assert full["ttft_speedup_vs_full"] == 1.0 and pruned["ttft_speedup_vs_full"] > 0
    assert pruned["ttft_speedup_paired_median"] > 0
    # selection runs only for pruned images: 2 measured images at K=16, none at full budget
    assert full["selection"]["images"] == 0 and full["selection"]["pct_of_ttft"] == 0
    assert pruned["selection"]["images"] == 2
    assert 0 < pruned["selection"]["pct_of_ttft"] < 100
    assert report["server_metrics"]["selection_images"] == 4  # warm-up included
    assert report["targets"] is None  # K=64 was not run

    requests = report["requests"]
    assert len(requests) == 8 and sum(r["warmup"] for r in requests) == 4
    assert all(r["ok"] for r in requests)
    assert len(report["waves"]) == 4
