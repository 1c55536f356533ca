"""Accuracy retention: a VQA-style evaluation through the OpenAI endpoint at several budgets.

    python -m benchmarks.make_shapes_dataset out/shapes --items 200
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
The report gives each budget's scores and their % of the full-budget score, as a table,
accuracy.json (with every prediction) and accuracy.png.

Standard benchmarks: see docs/performance.md for a VLMEvalKit recipe (its OpenAI wrapper puts
extra constructor kwargs such as `visual_token_budget` into the request body).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx

from benchmarks.bench_common import (
    budget_body,
    budget_label,
    connect,
    describe_machine,
    fmt,
    image_url_for,
    machine_info,
    parse_budgets,
    pyplot,
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


async def ask(client: httpx.AsyncClient, model: str, image_url: str, question: str,
              budget: int | None, args: argparse.Namespace) -> dict:
    text = f"{question}\n{args.prompt_suffix}" if args.prompt_suffix else question
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": text},
        ]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        **budget_body(budget),
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


async def evaluate(base_url: str, model: str, items: list[dict], budgets: list[int | None],
                   base_dir: Path, args: argparse.Namespace) -> dict[str, list[dict]]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    semaphore = asyncio.Semaphore(args.concurrency)
    total = len(items) * len(budgets)
    done = 0
    started = time.perf_counter()
    answers: dict[str, list[dict]] = {budget_label(b): [None] * len(items) for b in budgets}
    urls = [image_url_for(item["image"], base_dir) for item in items]

    async with httpx.AsyncClient(base_url=base_url, headers=headers,
                                 timeout=httpx.Timeout(args.timeout)) as client:

        async def one(i: int, budget: int | None) -> None:
            nonlocal done
            async with semaphore:
                result = await ask(client, model, urls[i], items[i]["question"], budget, args)
            answers[budget_label(budget)][i] = result
            done += 1
            if done == total or done % max(1, total // 20) == 0:
                print(f"[{done}/{total}] {time.perf_counter() - started:.0f}s", file=sys.stderr,
                      flush=True)

        # Item-major order: every budget sees the same items at about the same time.
        await asyncio.gather(*(one(i, b) for i in range(len(items)) for b in budgets))
    return answers


def score(items: list[dict], answers: dict[str, list[dict]], budgets: list[int | None]):
    rows = []
    for budget in budgets:
        label = budget_label(budget)
        results = answers[label]
        em, acc, kinds = [], [], {}
        for item, result in zip(items, results, strict=True):
            if not result["ok"]:
                continue
            result["exact_match"] = exact_match(result["text"], item["answers"])
            result["vqa_accuracy"] = vqa_accuracy(result["text"], item["answers"])
            em.append(result["exact_match"])
            acc.append(result["vqa_accuracy"])
            kinds.setdefault(item.get("kind", "all"), []).append(result["vqa_accuracy"])
        ok = [r for r in results if r["ok"]]
        errors = [r for r in results if not r["ok"]]
        kept = [r["visual_tokens_kept"] for r in ok if r.get("visual_tokens_kept") is not None]
        rows.append({
            "budget": label,
            "questions": len(ok),
            "errors": len(errors),
            "first_error": errors[0]["error"] if errors else None,
            "exact_match": 100 * statistics.fmean(em) if em else None,
            "vqa_accuracy": 100 * statistics.fmean(acc) if acc else None,
            "vqa_accuracy_by_kind": {
                k: 100 * statistics.fmean(v) for k, v in sorted(kinds.items())
            },
            "visual_tokens_kept_mean": statistics.fmean(kept) if kept else None,
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in ok) if ok else None,
            "latency_mean_s": statistics.fmean(r["latency_s"] for r in ok) if ok else None,
        })
    full = next((r for r in rows if r["budget"] == "full"), None)
    for row in rows:
        for key in ("exact_match", "vqa_accuracy"):
            base = full[key] if full else None
            row[f"{key}_pct_of_full"] = (
                100 * row[key] / base if base and row[key] is not None else None
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'budget':>6} {'kept':>5} {'n':>4} {'err':>3} {'EM %':>6} {'VQA acc %':>9} "
          f"{'EM % of full':>12} {'VQA % of full':>13} {'latency':>8}")
    for r in rows:
        print(
            f"{r['budget']:>6} {fmt(r['visual_tokens_kept_mean'], '.0f'):>5} "
            f"{r['questions']:>4} {r['errors']:>3} {fmt(r['exact_match'], '.1f'):>6} "
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


def plot(rows: list[dict], report: dict, path: Path) -> None:
    plt = pyplot()
    labels = [r["budget"] for r in rows]
    x = list(range(len(rows)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    fig.suptitle(f"accuracy retention: {report['server']['model']} on {report['data']['path']} "
                 f"({report['data']['questions']} questions)", fontsize=10)
    for key, name, offset in (("vqa_accuracy", "VQA accuracy", -0.2),
                              ("exact_match", "exact match", 0.2)):
        left.bar([i + offset for i in x], [r[key] or 0 for r in rows], width=0.4, label=name)
    left.set_xticks(x, labels)
    left.set_xlabel("visual_token_budget")
    left.set_ylabel("score (%)")
    left.set_title("scores")
    left.legend()
    for key, name, style in (("vqa_accuracy_pct_of_full", "VQA accuracy", "o-"),
                             ("exact_match_pct_of_full", "exact match", "s--")):
        right.plot(x, [r[key] if r[key] is not None else float("nan") for r in rows], style,
                   label=name)
    right.axhline(100, color="gray", linestyle=":")
    right.set_xticks(x, labels)
    right.set_xlabel("visual_token_budget")
    right.set_ylabel("% of the full-budget score")
    right.set_title("retention")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        print(f"{len(items)} questions x {len(budgets)} budgets against {target.base_url} "
              f"({target.model})", file=sys.stderr, flush=True)
        answers = asyncio.run(evaluate(target.base_url, target.model, items, budgets,
                                       data.parent, args))
    wall = time.perf_counter() - t0
    rows = score(items, answers, budgets)
    report = {
        "benchmark": "idselect accuracy retention",
        "version": 1,
        "started_at": started_at,
        "machine": machine,
        "server": {"base_url": target.base_url, "model": target.model,
                   "started_by_benchmark": target.started},
        "data": {"path": str(data), "questions": len(items)},
        "settings": {"budgets": [budget_label(b) for b in budgets], "max_tokens": args.max_tokens,
                     "prompt_suffix": args.prompt_suffix, "concurrency": args.concurrency,
                     "temperature": 0},
        "scoring": {
            "normalization": "VQA: lower case, punctuation, articles, number words, contractions",
            "exact_match": "normalized prediction == normalized majority answer",
            "vqa_accuracy": "min(#answers matching the normalized prediction / 3, 1)",
        },
        "wall_s": wall,
        "budgets": rows,
        "items": [
            {"id": item["id"], "question": item["question"], "answers": item["answers"],
             "kind": item.get("kind"),
             "predictions": {label: answers[label][i] for label in answers}}
            for i, item in enumerate(items)
        ],
    }
    (out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, report, out / "accuracy.png")
    print(f"\n{describe_machine(machine)}; {len(items)} questions x {len(budgets)} budgets in "
          f"{wall:.0f}s\n")
    print_table(rows)
    print(f"\nwrote {out / 'accuracy.json'} and {out / 'accuracy.png'}")
    return report


if __name__ == "__main__":
    main()
