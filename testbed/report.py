"""Validity checks and targets of the shapes test bed, from an accuracy run with selectors.

    python -m testbed.report out/accuracy/accuracy.json \
        --data out/shapes-eval/data.jsonl --model models/shapes-llava

Reads `benchmarks/accuracy.py`'s report (every prediction of every selector and budget) and adds:

1. Validity, before any comparison: the full-budget exact match per question kind must be
   >= 90%, and keeping the patches that cover the objects (the oracle: round-robin over the
   recorded objects, each object's most-covered patches first) must beat random patches clearly
   at K=16. The server has no oracle selector, so both run in transformers on the same weights
   and questions (greedy first answer token, the answer words are single tokens); the
   transformers full-budget answers are checked against the server's as a cross-check.
2. Targets: `id_select` keeps >= 90% of the full-budget exact match at K=16, and beats every other
   selector at K <= 32 on the count questions and on the multi-object questions (images with 3 or
   more shapes), each difference with a paired 95% bootstrap interval.

Writes shapes_report.json and shapes_report.md (the tables docs/performance.md quotes) beside the
accuracy report, and prints the Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.accuracy import load_items, wilson

FULL_FLOOR = 90.0  # % exact match, every kind, full budget
RETENTION_TARGET = 90.0  # % of full, id_select at K=16
ORACLE_MARGIN = 5.0  # points: the oracle's lead over random at K=16 must have a CI above this
MULTI_OBJECT = 3  # shapes in the image for a "multi-object" question
RESAMPLES = 2000


def paired_difference(a: np.ndarray, b: np.ndarray, seed: int = 0) -> dict:
    """Mean of a - b in points (%) with a paired bootstrap 95% interval over the questions."""
    rng = np.random.default_rng(seed)
    diff = 100 * (a.astype(float) - b.astype(float))
    draws = diff[rng.integers(0, len(diff), size=(RESAMPLES, len(diff)))].mean(1)
    return {"points": float(diff.mean()),
            "ci95": [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]}


def hits_by_run(report: dict) -> dict[str, np.ndarray]:
    """label -> 0/1 exact match per question (errors count as wrong and are listed)."""
    out = {}
    for label in report["settings"]["runs"]:
        out[label] = np.array([bool(item["predictions"][label].get("exact_match"))
                               for item in report["items"]])
    return out


def oracle_check(model_dir: Path, items: list[dict], base_dir: Path, k: int = 16) -> dict:
    """Full, oracle@k and random@k in transformers: per-question 0/1 arrays."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from testbed.data import Scene, pixels_of
    from testbed.reading import answers_right
    from testbed.task import Shape, patch_coverage

    processor = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, list[bool]] = {"full": [], f"oracle@{k}": [], f"random@{k}": []}
    for at in range(0, len(items), 100):
        part = items[at:at + 100]
        scenes = []
        for item in part:
            objects = [Shape(o["shape"], o["color"], tuple(o["box"])) for o in item["objects"]]
            scenes.append(Scene(objects, patch_coverage(objects),
                                {item["kind"]: (item["question"], item["answers"][0])}))
        pixels = pixels_of([Image.open(base_dir / item["image"]).convert("RGB") for item in part])
        for name, mode, kk in (("full", "full", 576), (f"oracle@{k}", "oracle", k),
                               (f"random@{k}", "random", k)):
            out[name] += [right for _, right in answers_right(
                model, processor.tokenizer, pixels, scenes, mode, kk, seed=at)]
        print(f"oracle check: {at + len(part)}/{len(items)}", file=sys.stderr, flush=True)
    return {name: np.array(v) for name, v in out.items()}


def build(report: dict, items: list[dict], transformers_hits: dict | None) -> dict:
    hits = hits_by_run(report)
    kinds = np.array([item.get("kind") for item in items])
    objects = np.array([len(item.get("objects", [])) for item in items])
    selectors = report["settings"]["selectors"] or []
    budgets = [int(b) for b in report["settings"]["budgets"] if b != "full"]
    full = hits["full"]

    validity: dict = {"full_by_kind": {}}
    for kind in sorted(set(kinds)):
        mask = kinds == kind
        score = 100 * full[mask].mean()
        validity["full_by_kind"][kind] = {"questions": int(mask.sum()), "exact_match": score,
                                          "ci95": wilson(list(full[mask].astype(float))),
                                          "ok": bool(score >= FULL_FLOOR)}
    validity["full_ok"] = all(v["ok"] for v in validity["full_by_kind"].values())
    if transformers_hits is not None:
        oracle, random_ = transformers_hits["oracle@16"], transformers_hits["random@16"]
        lead = paired_difference(oracle, random_)
        validity["oracle_16"] = {"exact_match": 100 * oracle.mean(),
                                 "ci95": wilson(list(oracle.astype(float)))}
        validity["random_16"] = {"exact_match": 100 * random_.mean(),
                                 "ci95": wilson(list(random_.astype(float)))}
        validity["oracle_minus_random_16"] = lead
        validity["oracle_ok"] = bool(lead["ci95"][0] > ORACLE_MARGIN)
        agree = transformers_hits["full"] == full
        validity["transformers_vs_server_full_agreement"] = float(agree.mean())
    validity["ok"] = validity["full_ok"] and validity.get("oracle_ok", False)

    groups = {"all": np.ones(len(items), bool), "count": kinds == "count",
              f"multi-object (>= {MULTI_OBJECT} shapes)": objects >= MULTI_OBJECT}
    table: dict = {}
    for selector in selectors:
        for k in budgets:
            label = f"{selector}@{k}"
            table[label] = {
                name: {"questions": int(mask.sum()),
                       "exact_match": 100 * hits[label][mask].mean() if mask.any() else None,
                       "pct_of_full": (100 * hits[label][mask].mean() / full[mask].mean()
                                       if mask.any() and full[mask].mean() else None)}
                for name, mask in groups.items()}
            table[label]["by_kind"] = {kind: 100 * hits[label][kinds == kind].mean()
                                       for kind in sorted(set(kinds))}

    targets: dict = {}
    rows = {r["label"]: r for r in report["budgets"]}
    if "id_select@16" in rows:
        row = rows["id_select@16"]
        targets["id_select_16_retention"] = {
            "pct_of_full": row["exact_match_pct_of_full"],
            "ci95": row["exact_match_pct_of_full_ci95"],
            "met": bool((row["exact_match_pct_of_full"] or 0) >= RETENTION_TARGET)}
    beats = []
    for k in (k for k in budgets if k <= 32):
        for name, mask in groups.items():
            if name == "all" or "id_select" not in selectors:
                continue
            for other in (s for s in selectors if s != "id_select"):
                d = paired_difference(hits[f"id_select@{k}"][mask], hits[f"{other}@{k}"][mask])
                beats.append({"k": k, "questions": name, "vs": other, **d,
                              "met": d["points"] > 0, "significant": d["ci95"][0] > 0})
    targets["id_select_beats_others"] = beats
    targets["beats_met"] = bool(beats) and all(b["met"] for b in beats)
    return {"validity": validity, "table": table, "targets": targets,
            "selectors": selectors, "budgets": budgets, "groups": list(groups)}


def _ci(ci) -> str:
    return f"{ci[0]:.1f}-{ci[1]:.1f}" if ci else "-"


def markdown(result: dict, report: dict) -> str:
    v, t = result["validity"], result["targets"]
    rows = {r["label"]: r for r in report["budgets"]}
    lines = [f"Questions: {report['data']['questions']} ({report['data']['path']}); model "
             f"{report['server']['model']}; exact match, 95% intervals.", "",
             "**Validity**", "", "| check | value | 95% CI | ok |", "|---|---|---|---|"]
    for kind, row in v["full_by_kind"].items():
        ok = f"{'yes' if row['ok'] else 'NO'} (>= {FULL_FLOOR:.0f})"
        lines.append(f"| full budget, {kind} ({row['questions']} q) | {row['exact_match']:.1f}% "
                     f"| {_ci(row['ci95'])} | {ok} |")
    if "oracle_16" in v:
        d = v["oracle_minus_random_16"]
        lines += [
            f"| oracle patches, K=16 | {v['oracle_16']['exact_match']:.1f}% | "
            f"{_ci(v['oracle_16']['ci95'])} | |",
            f"| random patches, K=16 | {v['random_16']['exact_match']:.1f}% | "
            f"{_ci(v['random_16']['ci95'])} | |",
            f"| oracle - random, K=16 | {d['points']:+.1f} pt | {_ci(d['ci95'])} | "
            f"{'yes' if v['oracle_ok'] else 'NO'} (CI above +{ORACLE_MARGIN:.0f} pt) |",
            f"| transformers = server at full budget | "
            f"{100 * v['transformers_vs_server_full_agreement']:.1f}% of questions | | |",
        ]
    full = rows.get("full")
    lines += ["", "**Exact match as % of the full budget** (full: "
              f"{full['exact_match']:.1f}%, CI {_ci(full['exact_match_ci95'])})" if full else "",
              "", "| selector | " + " | ".join(f"K={k}" for k in result["budgets"]) + " |",
              "|---|" + "---|" * len(result["budgets"])]
    for selector in result["selectors"]:
        cells = []
        for k in result["budgets"]:
            row = rows[f"{selector}@{k}"]
            cells.append(f"{row['exact_match_pct_of_full']:.1f} "
                         f"({_ci(row['exact_match_pct_of_full_ci95'])})")
        lines.append(f"| {selector} | " + " | ".join(cells) + " |")
    kinds = list(next(iter(result["table"].values()))["by_kind"]) if result["table"] else []
    small = [k for k in result["budgets"] if k <= 32]
    lines += ["", "**Exact match (%) per question kind, K <= 32**", "",
              "| selector | K | " + " | ".join(kinds) + " | multi-object |",
              "|---|---|" + "---|" * (len(kinds) + 1)]
    if full:
        lines.append("| full | 576 | " + " | ".join(
            f"{v['full_by_kind'][k]['exact_match']:.1f}" for k in kinds) + " | |")
    multi = result["groups"][2]
    for k in small:
        for selector in result["selectors"]:
            cell = result["table"][f"{selector}@{k}"]
            lines.append(f"| {selector} | {k} | " + " | ".join(
                f"{cell['by_kind'][kind]:.1f}" for kind in kinds)
                + f" | {cell[multi]['exact_match']:.1f} |")
    lines += ["", "**Targets**", ""]
    if "id_select_16_retention" in t:
        r = t["id_select_16_retention"]
        lines.append(f"- id_select at K=16 keeps {r['pct_of_full']:.1f}% of full (CI "
                     f"{_ci(r['ci95'])}): {'met' if r['met'] else 'NOT met'} (>= "
                     f"{RETENTION_TARGET:.0f}%).")
    beats = t["id_select_beats_others"]
    misses = [b for b in beats if not b["met"]]
    lines.append(f"- id_select beats every other selector at K <= 32 on count and multi-object "
                 f"questions: {'met' if t['beats_met'] else 'NOT met'} "
                 f"({len(beats) - len(misses)}/{len(beats)} comparisons ahead, "
                 f"{sum(b['significant'] for b in beats)} with a CI above 0).")
    for b in misses:
        lines.append(f"  - not ahead: K={b['k']}, {b['questions']}, vs {b['vs']}: "
                     f"{b['points']:+.1f} pt (CI {_ci(b['ci95'])})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", help="accuracy.json of a run with --selectors")
    parser.add_argument("--data", required=True, help="the shapes data.jsonl it ran on")
    parser.add_argument("--model", default=None,
                        help="the model directory, for the oracle check in transformers")
    args = parser.parse_args(argv)
    report_path = Path(args.report)
    report = json.loads(report_path.read_text())
    items = load_items(Path(args.data))
    if [i["id"] for i in items][:len(report["items"])] != [i["id"] for i in report["items"]]:
        raise SystemExit(f"{args.data} does not hold the questions of {args.report}")
    items = items[:len(report["items"])]
    transformers_hits = (oracle_check(Path(args.model), items, Path(args.data).parent)
                         if args.model else None)
    result = build(report, items, transformers_hits)
    text = markdown(result, report)
    (report_path.parent / "shapes_report.json").write_text(json.dumps(result, indent=2) + "\n")
    (report_path.parent / "shapes_report.md").write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
