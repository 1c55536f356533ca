"""Accuracy retention: a VQA-style evaluation through the OpenAI endpoint at several budgets.

    python -m testbed.task out/shapes --items 200
    python -m benchmarks.accuracy --data out/shapes/data.jsonl --base-url http://127.0.0.1:8000 \
        --budgets full,192,64,16

Input: JSONL, one question per line:
    {"id": "...", "image": "images/1.png" | "data:image/png;base64,..." | "https://...",
     "question": "What color is the square?", "answers": ["red", "red", ...]}
(`id` optional; relative image paths are relative to the JSONL file; `kind` optional, reported
per kind.) Every question is asked once per budget (temperature 0, the LLaVA-1.5 short-answer
prompt appended, as in its VQAv2 evaluation) and scored with the standard VQA answer
normalisation (lower case, punctuation, articles, number words to digits, contractions):
- exact match: the normalised prediction equals the normalised majority answer;
- VQA accuracy: min(#answers equal to the prediction / 3, 1) (the VQAv2 formula without the
  10-choose-9 averaging).
With `--selectors id_select,topk,...` (or `all`) every budget is asked once per
`visual_token_selector` (the full budget once: nothing is selected there). The report gives each
setting's scores (overall and per kind) and their % of the full-budget score, with 95% intervals
(Wilson for a score, a paired bootstrap over the questions for its % of full), as a table,
accuracy.json (with every prediction) and accuracy.png (with selectors: retention vs K, one line
per selector, and the scores per kind at the smallest K).

Standard benchmarks: see docs/performance.md for a VLMEvalKit recipe (its OpenAI wrapper puts
extra constructor kwargs such as `visual_token_budget` into the request body).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.accuracy_plot import plot
from benchmarks.bench_common import (
    budget_body,
    budget_label,
    connect,
    describe_machine,
    fmt,
    image_url_for,
    machine_info,
    parse_budgets,
)

SHORT_ANSWER = "Answer the question using a single word or phrase."
DEFAULT_BUDGETS = "full,192,64,16"

# ----------------------------------------------------------------------------- normalisation
# The rules of the official VQA evaluation (Antol et al. 2015; vqaEval.py), re-implemented.

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Im": "I'm", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "lets": "let's",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "wasnt": "wasn't", "wed": "we'd", "weve": "we've", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    for p in _PUNCTUATION:
        # Punctuation next to a space (or a 1,000-style number) disappears; inside a word it
        # becomes a space ("black-and-white" -> "black and white").
        if (p + " " in text or " " + p in text) or _DIGIT_COMMA.search(text):
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    return _PERIOD.sub("", text)


def normalize_answer(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    words = []
    for word in _punctuation(text).lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def majority_answer(answers: list[str]) -> str:
    normalized = [normalize_answer(a) for a in answers]
    counts = Counter(normalized)
    best = max(counts.values())
    return next(a for a in normalized if counts[a] == best)  # ties: first listed


def exact_match(prediction: str, answers: list[str]) -> float:
    return float(normalize_answer(prediction) == majority_answer(answers))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return min(sum(normalize_answer(a) == pred for a in answers) / 3, 1.0)


# ----------------------------------------------------------------------------------- running


def load_items(path: Path, limit: int | None = None) -> list[dict]:
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        missing = {"image", "question", "answers"} - item.keys()
        if missing:
            raise ValueError(f"{path}:{number}: missing {sorted(missing)}")
        if not isinstance(item["answers"], list) or not item["answers"]:
            raise ValueError(f"{path}:{number}: answers must be a non-empty list")
        item.setdefault("id", str(number))
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    return items


@dataclass(frozen=True)
class Run:
    """One setting every question is asked at: a budget and, optionally, a selector (the
    server's default when None). The full budget sends neither: no tokens are selected."""

    budget: int | None
    selector: str | None = None

    @property
    def label(self) -> str:
        if self.budget is None or self.selector is None:
            return budget_label(self.budget)
        return f"{self.selector}@{self.budget}"

    def body(self) -> dict:
        chosen = {} if self.budget is None or self.selector is None else {
            "visual_token_selector": self.selector}
        return {**budget_body(self.budget), **chosen}


def runs_for(budgets: list[int | None], selectors: list[str] | None) -> list[Run]:
    """Every budget (x every selector, when given); the full budget once."""
    if not selectors:
        return [Run(b) for b in budgets]
    return [Run(None)] * (None in budgets) + [
        Run(b, s) for s in selectors for b in budgets if b is not None]


async def ask(client: httpx.AsyncClient, model: str, image_url: str, question: str,
              run: Run, args: argparse.Namespace) -> dict:
    text = f"{question}\n{args.prompt_suffix}" if args.prompt_suffix else question
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": text},
        ]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        **run.body(),
    }
    started = time.perf_counter()
    try:
        response = await client.post("/v1/chat/completions", json=body)
    except httpx.HTTPError as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"ok": False, "error": f"HTTP {response.status_code}: {response.text[:300]}"}
    data = response.json()
    usage = data.get("usage") or {}
    return {
        "ok": True,
        "text": data["choices"][0]["message"]["content"] or "",
        "latency_s": latency,
        "prompt_tokens": usage.get("prompt_tokens"),
        "visual_tokens_kept": usage.get("visual_tokens_kept"),
        "visual_tokens_original": usage.get("visual_tokens_original"),
    }


async def evaluate(base_url: str, model: str, items: list[dict], runs: list[Run],
                   base_dir: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    semaphore = asyncio.Semaphore(args.concurrency)
    total = len(items) * len(runs)
    done = 0
    started = time.perf_counter()
    answers: dict[str, list[dict]] = {run.label: [None] * len(items) for run in runs}
    urls = [image_url_for(item["image"], base_dir) for item in items]

    async with httpx.AsyncClient(base_url=base_url, headers=headers,
                                 timeout=httpx.Timeout(args.timeout)) as client:

        async def one(i: int, run: Run) -> None:
            nonlocal done
            async with semaphore:
                result = await ask(client, model, urls[i], items[i]["question"], run, args)
            answers[run.label][i] = result
            done += 1
            if done == total or done % max(1, total // 20) == 0:
                print(f"[{done}/{total}] {time.perf_counter() - started:.0f}s", file=sys.stderr,
                      flush=True)

        # Item-major order: every setting sees the same items at about the same time.
        await asyncio.gather(*(one(i, run) for i in range(len(items)) for run in runs))
    return answers


def score(items: list[dict], answers: dict[str, list[dict]], runs: list[Run],
          resamples: int = 2000) -> list[dict]:
    """One row per run: scores, 95% intervals (Wilson for a score, a paired bootstrap over the
    questions for its % of the full budget) and the same per question kind."""
    rows = []
    hits: dict[str, list[float]] = {}
    for run in runs:
        results = answers[run.label]
        em, acc, kinds = [], [], {}
        hits[run.label] = []
        for item, result in zip(items, results, strict=True):
            if not result["ok"]:
                hits[run.label].append(math.nan)
                continue
            result["exact_match"] = exact_match(result["text"], item["answers"])
            result["vqa_accuracy"] = vqa_accuracy(result["text"], item["answers"])
            em.append(result["exact_match"])
            acc.append(result["vqa_accuracy"])
            hits[run.label].append(result["exact_match"])
            kinds.setdefault(item.get("kind", "all"), []).append(result)
        ok = [r for r in results if r["ok"]]
        errors = [r for r in results if not r["ok"]]
        kept = [r["visual_tokens_kept"] for r in ok if r.get("visual_tokens_kept") is not None]
        rows.append({
            "label": run.label,
            "budget": budget_label(run.budget),
            "selector": run.selector,
            "questions": len(ok),
            "errors": len(errors),
            "first_error": errors[0]["error"] if errors else None,
            "exact_match": 100 * statistics.fmean(em) if em else None,
            "exact_match_ci95": wilson(em),
            "vqa_accuracy": 100 * statistics.fmean(acc) if acc else None,
            "vqa_accuracy_by_kind": {
                k: 100 * statistics.fmean(r["vqa_accuracy"] for r in v)
                for k, v in sorted(kinds.items())
            },
            "exact_match_by_kind": {
                k: {"questions": len(v),
                    "exact_match": 100 * statistics.fmean(r["exact_match"] for r in v),
                    "ci95": wilson([r["exact_match"] for r in v])}
                for k, v in sorted(kinds.items())
            },
            "visual_tokens_kept_mean": statistics.fmean(kept) if kept else None,
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else None,
            "latency_mean_s": statistics.fmean(r["latency_s"] for r in ok) if ok else None,
        })
    full = next((r for r in rows if r["budget"] == "full"), None)
    intervals = retention_ci95(hits, "full", resamples) if full else {}
    for row in rows:
        for key in ("exact_match", "vqa_accuracy"):
            base = full[key] if full else None
            row[f"{key}_pct_of_full"] = (
                100 * row[key] / base if base and row[key] is not None else None
            )
        row["exact_match_pct_of_full_ci95"] = intervals.get(row["label"])
    return rows


def wilson(hits: list[float], z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a share of 0/1 outcomes, in %."""
    n = len(hits)
    if not n:
        return None
    p = sum(hits) / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [100 * max(0.0, centre - half), 100 * min(1.0, centre + half)]


def retention_ci95(hits: dict[str, list[float]], base: str, resamples: int, seed: int = 0,
                   ) -> dict[str, list[float] | None]:
    """Paired bootstrap over the questions: each run's exact match as % of `base`'s on the same
    resampled questions (questions a run got an error on are left out of both)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    reference = np.asarray(hits[base], dtype=float)
    n = len(reference)
    draws = rng.integers(0, n, size=(resamples, n))
    out: dict[str, list[float] | None] = {}
    for label, values in hits.items():
        values = np.asarray(values, dtype=float)
        both = ~np.isnan(values) & ~np.isnan(reference)
        weights = both[draws]
        ref = (np.nan_to_num(reference)[draws] * weights).sum(1)
        run = (np.nan_to_num(values)[draws] * weights).sum(1)
        ratio = 100 * run[ref > 0] / ref[ref > 0]
        out[label] = ([float(np.percentile(ratio, 2.5)), float(np.percentile(ratio, 97.5))]
                      if len(ratio) else None)
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'setting':>14} {'kept':>5} {'n':>4} {'err':>3} {'EM %':>6} {'EM 95% CI':>12} "
          f"{'VQA acc %':>9} {'EM % of full':>12} {'VQA % of full':>13} {'latency':>8}")
    for r in rows:
        ci = r["exact_match_ci95"]
        print(
            f"{r['label']:>14} {fmt(r['visual_tokens_kept_mean'], '.0f'):>5} "
            f"{r['questions']:>4} {r['errors']:>3} {fmt(r['exact_match'], '.1f'):>6} "
            f"{(f'{ci[0]:.1f}-{ci[1]:.1f}' if ci else '-'):>12} "
            f"{fmt(r['vqa_accuracy'], '.1f'):>9} "
            f"{fmt(r['exact_match_pct_of_full'], '.1f', 'n/a'):>12} "
            f"{fmt(r['vqa_accuracy_pct_of_full'], '.1f', 'n/a'):>13} "
            f"{fmt(r['latency_mean_s'], '.2f'):>7}s"
            + (f"  ({r['errors']} errors: {r['first_error']})" if r["errors"] else "")
        )
    if any(r["budget"] == "full" for r in rows) and not any(
        r["vqa_accuracy_pct_of_full"] for r in rows
    ):
        print("(% of full is n/a: the full-budget score is 0)")


def parse_selectors(text: str | None) -> list[str] | None:
    """'id_select,topk' -> those names (checked against the server's); 'all' -> every one."""
    from idselect.options import SELECTORS

    if not text:
        return None
    names = list(SELECTORS) if text.strip() == "all" else [
        s for s in text.replace(" ", ",").split(",") if s]
    unknown = [s for s in names if s not in SELECTORS]
    if unknown:
        raise SystemExit(f"unknown selectors {unknown}; known: {', '.join(SELECTORS)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="JSONL of image + question + answers")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base-url", help="a running server (default http://127.0.0.1:8000)")
    where.add_argument("--start", metavar="MODEL_DIR",
                       help="start `idselect serve MODEL_DIR` on 127.0.0.1 for the run "
                       "('tiny' / 'realistic' write those models first)")
    parser.add_argument("--server-args", default=None, help="vLLM options for --start")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="comma-separated budgets, 'full' = none sent (default %(default)s)")
    parser.add_argument("--selectors", default=None,
                        help="comma-separated visual_token_selector values to compare at every "
                        "budget ('all': every selector); default: the server's own")
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--prompt-suffix", default=SHORT_ANSWER,
                        help="appended to each question on a new line ('' for none)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", default="out/bench-accuracy", help="output directory")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    runs = runs_for(budgets, parse_selectors(args.selectors))
    data = Path(args.data)
    items = load_items(data, args.limit)
    if not items:
        raise SystemExit(f"{data}: no questions")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    t0 = time.perf_counter()
    with connect(args.base_url, args.start, args.server_args, out, args.api_key) as target:
        print(f"{len(items)} questions x {len(runs)} settings against {target.base_url} "
              f"({target.model})", file=sys.stderr, flush=True)
        answers = asyncio.run(evaluate(target.base_url, target.model, items, runs,
                                       data.parent, args))
    wall = time.perf_counter() - t0
    rows = score(items, answers, runs)
    report = {
        "benchmark": "idselect accuracy retention",
        "version": 2,
        "started_at": started_at,
        "machine": machine,
        "server": {"base_url": target.base_url, "model": target.model,
                   "started_by_benchmark": target.started},
        "data": {"path": str(data), "questions": len(items)},
        "settings": {"budgets": [budget_label(b) for b in budgets],
                     "selectors": parse_selectors(args.selectors),
                     "runs": [run.label for run in runs], "max_tokens": args.max_tokens,
                     "prompt_suffix": args.prompt_suffix, "concurrency": args.concurrency,
                     "temperature": 0},
        "scoring": {
            "normalization": "VQA: lower case, punctuation, articles, number words, contractions",
            "exact_match": "normalized prediction == normalized majority answer",
            "vqa_accuracy": "min(#answers matching the normalized prediction / 3, 1)",
            "ci95": "Wilson interval for a score; paired bootstrap over the questions (2,000 "
                    "resamples, seed 0) for a score as % of the full budget's",
        },
        "wall_s": wall,
        "budgets": rows,
        "items": [
            {"id": item["id"], "question": item["question"], "answers": item["answers"],
             "kind": item.get("kind"), "objects": len(item.get("objects", [])) or None,
             "predictions": {label: answers[label][i] for label in answers}}
            for i, item in enumerate(items)
        ],
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, report, out / "accuracy.png")
    print(f"\n{describe_machine(machine)}; {len(items)} questions x {len(runs)} settings in "
          f"{wall:.0f}s\n")
    print_table(rows)
    print(f"\nwrote {out / 'accuracy.json'} and {out / 'accuracy.png'}")
    return report


if __name__ == "__main__":
    main()
