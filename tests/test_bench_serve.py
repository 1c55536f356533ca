"""The serving benchmark runs end to end: stock vLLM and `idselect serve` on the tiny model,
driven by vLLM's own `vllm bench serve`, in one run.

Small counts (two budgets, two requests in flight, four requests per cell): checks the outputs
exist and say what the servers did (every request completed, the kept tokens per image the
server reported); the tiny model's timings mean nothing, so nothing is asserted about them. The
regression check's logic is checked on given numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.serve import missed, stock_ratios, table
from devtools.launch import TINY_MODEL_ARGS
from tests.server_harness import EAGER

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.engine
def test_serving_benchmark_writes_json_table_and_plot_with_the_stock_baseline(
        tiny_model_dir, tmp_path):
    out = tmp_path / "bench"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.serve", "--start", str(tiny_model_dir),
         "--budgets", "full,16", "--concurrency", "2", "--num-prompts", "4",
         "--max-tokens", "3", "--out", str(out),
         "--server-args", " ".join([*TINY_MODEL_ARGS, *EAGER])],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "serve.json").read_text())
    rows = {(r["server"], r["budget"]): r for r in report["rows"]}
    assert set(rows) == {("stock", "full"), ("idselect", "full"), ("idselect", "16")}
    for row in rows.values():
        assert row["concurrency"] == 2 and row["completed"] == 4 and row["failed"] == 0
        assert row["requests_per_s"] > 0 and 0 < row["ttft_p50_ms"] <= row["e2el_p99_ms"]
    assert rows["idselect", "full"]["visual_tokens_kept_per_image"] == 576
    assert rows["idselect", "16"]["visual_tokens_kept_per_image"] == 16
    assert rows["stock", "full"]["visual_tokens_kept_per_image"] is None  # no plugin there
    assert report["predicted_ttft_speedup"]["16"] > 1
    assert set(report["stock_ratio"]["by_concurrency"]) == {"2"}
    assert (out / "serve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| stock vLLM | 2 | full |" in (out / "serve.md").read_text()
    for kind in ("stock", "idselect"):
        assert (out / f"server-{kind}.log").exists()
    assert "idselect full / stock req/s: 2 in flight" in done.stdout


def test_the_stock_ratio_check():
    rows = [
        {"server": "stock", "concurrency": 1, "budget": "full", "requests_per_s": 10.0},
        {"server": "idselect", "concurrency": 1, "budget": "full", "requests_per_s": 9.6},
        {"server": "idselect", "concurrency": 1, "budget": "16", "requests_per_s": 15.0},
        {"server": "stock", "concurrency": 8, "budget": "full", "requests_per_s": 20.0},
        {"server": "idselect", "concurrency": 8, "budget": "full", "requests_per_s": 18.0},
    ]
    ratios = stock_ratios(rows)
    assert ratios == {1: pytest.approx(0.96), 8: pytest.approx(0.9)}
    assert missed(ratios, 0.95) == [8]
    assert missed(ratios, 0.9) == []
    filled = [{**r, "output_tokens_per_s": 1.0, "visual_tokens_kept_per_image": None,
               **{f"{m}_p{p}_ms": 1.0 for m in ("ttft", "e2el") for p in (50, 99)}}
              for r in rows]
    text = table(filled, {"16": 1.8})
    assert "| idselect | 1 | 16 | - | 15.00 | 1.50x |" in text and "1.80 |" in text
