"""The shapes report's checks on a hand-made accuracy report (no server: the arithmetic of the
validity checks and targets; `test_shapes_testbed.py` runs the real pipeline)."""

from __future__ import annotations

import numpy as np

from benchmarks.accuracy import Run, score
from testbed.report import build, markdown, paired_difference


def _report(items, right):
    """An accuracy.json-shaped report; right[label][i]: is question i answered right."""
    runs = [Run(None)] + [Run(k, s) for s in ("id_select", "topk") for k in (32, 16)]
    answers = {run.label: [
        {"ok": True, "text": item["answers"][0] if right[run.label][i] else "wrong",
         "latency_s": 0.1, "prompt_tokens": 1, "visual_tokens_kept": run.budget or 576}
        for i, item in enumerate(items)] for run in runs}
    rows = score(items, answers, runs, resamples=200)
    return {"settings": {"runs": [r.label for r in runs], "selectors": ["id_select", "topk"],
                         "budgets": ["full", "32", "16"]},
            "budgets": rows, "data": {"questions": len(items), "path": "d"},
            "server": {"model": "m"},
            "items": [{"predictions": {label: answers[label][i] for label in answers}}
                      for i in range(len(items))]}


def test_validity_and_targets():
    kinds = ["count", "color"] * 50
    items = [{"kind": k, "answers": ["2"] * 10, "objects": [{}] * (1 + i % 4)}
             for i, k in enumerate(kinds)]
    n = len(items)
    right = {"full": [True] * n, "id_select@32": [True] * n, "id_select@16": [i % 10 != 0
                                                                              for i in range(n)],
             "topk@32": [k != "count" for k in kinds], "topk@16": [k != "count" for k in kinds]}
    report = _report(items, right)
    transformers = {"full": np.ones(n, bool), "oracle@16": np.ones(n, bool),
                    "random@16": np.array([i % 2 == 0 for i in range(n)])}
    result = build(report, items, transformers)
    v, t = result["validity"], result["targets"]
    assert v["full_ok"] and v["oracle_ok"] and v["ok"]
    assert v["oracle_minus_random_16"]["points"] == 50
    assert v["transformers_vs_server_full_agreement"] == 1.0
    assert t["id_select_16_retention"]["pct_of_full"] == 90 and t["id_select_16_retention"]["met"]
    # topk misses every count question; id_select one question in ten: ahead on count and on
    # multi-object questions (half of them are counts) at both budgets.
    assert t["beats_met"] and all(b["vs"] == "topk" for b in t["id_select_beats_others"])
    text = markdown(result, report)
    assert "| id_select | 100.0" in text and "met (>= 90%)" in text

    right["full"] = [k != "color" or i % 4 != 1 for i, k in enumerate(kinds)]  # colour at 50%
    result = build(_report(items, right), items, None)
    assert not result["validity"]["full_by_kind"]["color"]["ok"]
    assert not result["validity"]["ok"]  # and no oracle check was run


def test_paired_difference_interval():
    a = np.array([1, 1, 0, 1] * 50, bool)
    b = np.array([1, 0, 0, 1] * 50, bool)
    d = paired_difference(a, b)
    assert d["points"] == 25 and d["ci95"][0] > 0 and d["ci95"][1] < 50
    assert paired_difference(a, a) == {"points": 0.0, "ci95": [0.0, 0.0]}


def test_linear_probe_reads_what_features_carry():
    """The sweep's probe: a label written into the features is read back on held-out rows; a
    label independent of them scores about its majority share."""
    import torch

    from testbed.sweep import linear_probe

    gen = torch.Generator().manual_seed(0)
    carried = torch.randint(0, 4, (2000,), generator=gen)
    noise = torch.randint(0, 3, (2000,), generator=gen)
    x = torch.randn(2000, 16, generator=gen)
    x[:, :4] += 3 * torch.nn.functional.one_hot(carried, 4)
    train = torch.arange(2000) < 1000
    probes = linear_probe(x, {"carried": carried, "noise": noise}, train)
    assert probes["carried"][0] > 0.95
    accuracy, majority = probes["noise"]
    assert abs(accuracy - majority) < 0.06 and majority < 0.4
