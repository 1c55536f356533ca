"""The accuracy-retention harness end to end: generated shapes data, a tiny-model server, the
OpenAI endpoint at two budgets; plus its scoring rules (no server). The tiny model answers
gibberish, so only the plumbing and the report's structure are checked, not the scores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.accuracy import (
    Run,
    exact_match,
    load_items,
    normalize_answer,
    retention_ci95,
    runs_for,
    score,
    vqa_accuracy,
    wilson,
)
from devtools.launch import TINY_MODEL_ARGS, running_server
from testbed.task import write_dataset
from tests.server_harness import EAGER

ROOT = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "benchmarks.accuracy"]  # run from the checkout, as documented


@pytest.mark.parametrize(("raw", "normalized"), [
    ("Red", "red"),
    ("The square.", "square"),
    ("  two\n", "2"),
    ("None", "0"),
    ("an apple!", "apple"),
    ("black-and-white", "black and white"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("dont", "don't"),
    ("Yes, it is.", "yes it is"),
])
def test_answer_normalisation(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_and_exact_match():
    answers = ["2", "2", "two", "3", "3", "2", "2", "2", "2", "4"]
    assert vqa_accuracy("Two.", answers) == 1.0
    assert vqa_accuracy("3", answers) == pytest.approx(2 / 3)
    assert vqa_accuracy("4", answers) == pytest.approx(1 / 3)
    assert vqa_accuracy("5", answers) == 0.0
    assert exact_match("two", answers) == 1.0  # the majority answer, normalised
    assert exact_match("3", answers) == 0.0
    assert exact_match("Red", ["red", "blue"]) == 1.0  # a tie goes to the first listed


def test_score_reports_percent_of_full():
    items = [{"question": "q", "answers": ["red"] * 10, "kind": "color"},
             {"question": "q", "answers": ["2"] * 10, "kind": "count"}]

    def ok(text):
        return {"ok": True, "text": text, "latency_s": 0.1, "prompt_tokens": 10,
                "visual_tokens_kept": 4, "visual_tokens_original": 576}

    answers = {"full": [ok("red"), ok("two")], "16": [ok("Red."), ok("3")],
               "8": [ok("blue"), {"ok": False, "error": "HTTP 500"}]}
    rows = {r["budget"]: r for r in score(items, answers, [Run(None), Run(16), Run(8)])}
    assert rows["full"]["vqa_accuracy"] == 100 and rows["16"]["vqa_accuracy"] == 50
    assert rows["16"]["vqa_accuracy_pct_of_full"] == 50
    assert rows["16"]["vqa_accuracy_by_kind"] == {"color": 100, "count": 0}
    assert rows["8"]["errors"] == 1 and rows["8"]["questions"] == 1
    assert rows["8"]["exact_match_pct_of_full"] == 0
    assert rows["16"]["exact_match_by_kind"]["color"]["questions"] == 1


def test_runs_labels_and_request_fields():
    runs = runs_for([None, 16, 8], ["id_select", "random"])
    assert [r.label for r in runs] == ["full", "id_select@16", "id_select@8", "random@16",
                                       "random@8"]
    assert runs[0].body() == {}  # full budget: no budget, no selector sent
    assert runs[3].body() == {"visual_token_budget": 16, "visual_token_selector": "random"}
    assert [r.label for r in runs_for([None, 16], None)] == ["full", "16"]
    assert Run(16).body() == {"visual_token_budget": 16}


def test_intervals():
    assert wilson([]) is None
    low, high = wilson([1.0] * 90 + [0.0] * 10)
    assert 82 < low < 90 < high < 95  # Wilson 95% for 90/100: 82.6-94.5
    assert wilson([1.0] * 5) == [pytest.approx(56.55, abs=0.01), 100.0]
    # Paired: a run equal to the base on every question retains exactly 100%.
    hits = {"full": [1.0, 0.0, 1.0, 1.0] * 25, "same": [1.0, 0.0, 1.0, 1.0] * 25,
            "half": [1.0, 0.0, 0.0, 1.0] * 25}
    intervals = retention_ci95(hits, "full", resamples=500)
    assert intervals["same"] == [100.0, 100.0]
    assert intervals["half"][0] < 100 * 2 / 3 < intervals["half"][1] < 100


def test_shapes_dataset_generator(tmp_path):
    path = write_dataset(tmp_path / "shapes", items=10, seed=3)
    items = load_items(path)
    assert len(items) == 10
    assert {i["kind"] for i in items} == {"color", "shape", "count", "exists", "relation"}
    for item in items:
        assert (path.parent / item["image"]).is_file()
        assert len(item["answers"]) == 10 and len(set(item["answers"])) == 1
    assert write_dataset(tmp_path / "again", items=10, seed=3).read_text() == path.read_text()


@pytest.mark.engine
def test_harness_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path):
    data = write_dataset(tmp_path / "shapes", items=4, seed=0)
    out = tmp_path / "accuracy"
    with running_server(tiny_model_dir, tmp_path / "server.log", *TINY_MODEL_ARGS,
                        *EAGER) as server:
        done = subprocess.run(
            [*COMMAND, "--data", str(data), "--base-url", server.base_url,
             "--budgets", "full,16", "--max-tokens", "4", "--concurrency", "2",
             "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "[8/8]" in done.stderr  # progress

    report = json.loads((out / "accuracy.json").read_text())
    png = (out / "accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    assert report["data"] == {"path": str(data), "questions": 4}
    assert report["settings"]["budgets"] == ["full", "16"]
    rows = report["budgets"]
    assert [r["budget"] for r in rows] == ["full", "16"]
    for row in rows:
        assert row["questions"] == 4 and row["errors"] == 0
        assert 0 <= row["exact_match"] <= 100 and 0 <= row["vqa_accuracy"] <= 100
        for key in ("exact_match_pct_of_full", "vqa_accuracy_pct_of_full"):
            assert key in row  # None when the full-budget score is 0
        assert set(row["vqa_accuracy_by_kind"]) == {"color", "shape", "count", "exists"}
    assert rows[0]["visual_tokens_kept_mean"] == 576 and rows[1]["visual_tokens_kept_mean"] == 16
    assert len(report["items"]) == 4
    for item in report["items"]:
        assert set(item["predictions"]) == {"full", "16"}
        for prediction in item["predictions"].values():
            assert prediction["ok"] and isinstance(prediction["text"], str)
            assert prediction["vqa_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    table = done.stdout
    assert "VQA acc %" in table and "% of full" in table
    assert [line.split()[0] for line in table.splitlines()
            if line.split() and line.split()[0] in ("full", "16")] == ["full", "16"]
