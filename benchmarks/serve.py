"""Serving benchmark: latency, throughput and cost of each visual token budget, on one server.

Drives an `idselect serve` OpenAI endpoint with streaming single-image chat requests at several
budgets (default: full, 192, 128, 64, 32, 16) in ONE run against ONE server, interleaved, and
reports per budget: time to first token (TTFT) p50/p99, end-to-end latency p50/p99, request
throughput, output tokens/s, prompt tokens per request, speedup vs the full budget, the speedup the
FLOPs model predicts (`idselect/flops.py`) and measured / predicted, and the time the engine spent
in ID-Selection as a share of TTFT (from `idselect_selection_seconds` on /metrics).

    python -m benchmarks.serve --start realistic --requests-per-budget 12   # CPU figures
    python -m benchmarks.serve --base-url http://127.0.0.1:8000             # a running server

How the load is shaped (and why):
- Waves. The run is a sequence of waves; a wave sends `--concurrency` requests of ONE budget at
  once and waits for all of them. Waves go round-robin over the budgets, and the order rotates
  every round, so slow drift (other work on the machine, thermal, caches) hits every budget
  alike. Keeping each wave to one budget means the engine batches only requests of that budget,
  so a budget's latency is its own, not a mix; and /metrics is scraped between waves, which
  attributes the selection histogram's growth to exactly one budget.
- Distinct images. Every request carries its own synthetic image (seeded by a per-run random salt
  unless --seed is given). vLLM caches encoder outputs and prompt prefixes by image hash: reusing
  an image would skip the vision tower (and the whole prefill on a repeat), hiding the cost that
  does not shrink with the budget and inflating speedups. Images are made before the clock
  starts.
- Fixed output length. `ignore_eos` with `--max-tokens` makes every request decode the same
  number of tokens, so latency and tokens/s compare across budgets.
- TTFT is the time to the first streamed chunk with a choice (vLLM sends it when the first token
  exists). Throughput per budget is its requests (or output tokens) over the wall time of its
  waves. Speedups are ratios of p50s against the full budget; `paired` is the median over rounds
  of full/K wave means (robust to drift between rounds).
- Selection share of TTFT per budget = selection seconds recorded during that budget's waves /
  the sum over those waves of the slowest request's TTFT (with concurrency 1: selection time /
  TTFT). The histogram is per image and unlabelled; the wave structure is what attributes it.
- One `--warmup-rounds` round (default 1) runs first and is not counted.

Outputs under --out (default out/bench-serve): serve.json (settings, machine, per-budget results,
every request), serve.png (latency, speedup vs prediction, throughput, selection share), and the
server log when --start is used. A table is printed at the end; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.bench_common import (
    DEFAULT_BUDGETS,
    Target,
    budget_body,
    budget_label,
    connect,
    data_url,
    describe_machine,
    fmt,
    machine_info,
    metric,
    metric_total,
    parse_budgets,
    pyplot,
    scrape_metrics,
    summary,
    synthetic_image,
)

PROMPT = "Describe the image in detail."
SELECTION_SUM = "idselect_selection_seconds_sum"
SELECTION_COUNT = "idselect_selection_seconds_count"
TARGET_BUDGET = 64
TARGET_RATIO = 0.8  # measured TTFT speedup >= 0.8 x predicted at K = 64
TARGET_SELECTION_PCT = 1.0  # selection <= 1% of TTFT at K = 64


@dataclass
class RequestResult:
    budget: int | None
    round: int
    wave: int
    warmup: bool
    ok: bool
    ttft_s: float | None = None
    e2e_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    visual_tokens_original: int | None = None
    visual_tokens_kept: int | None = None
    error: str | None = None


@dataclass
class Wave:
    budget: int | None
    round: int
    index: int
    warmup: bool
    wall_s: float
    selection_s: float
    selection_images: float
    max_ttft_s: float | None


async def one_request(
    client: httpx.AsyncClient, target: Target, budget: int | None, image_url: str,
    args: argparse.Namespace, round_: int, wave: int, warmup: bool,
) -> RequestResult:
    body = {
        "model": target.model,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": args.prompt},
        ]}],
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **budget_body(budget),
    }
    result = RequestResult(budget, round_, wave, warmup, ok=False)
    started = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:300]
                    return result
                if chunk.get("choices") and result.ttft_s is None:
                    result.ttft_s = time.perf_counter() - started
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.completion_tokens = usage.get("completion_tokens")
                    result.visual_tokens_original = usage.get("visual_tokens_original")
                    result.visual_tokens_kept = usage.get("visual_tokens_kept")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    result.e2e_s = time.perf_counter() - started
    result.ok = result.ttft_s is not None and result.prompt_tokens is not None
    if not result.ok:
        result.error = "stream ended without a token or without usage"
    return result


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def make_images(count: int, seed: int, size: int) -> list[str]:
    return [data_url(synthetic_image(seed + i, size)) for i in range(count)]


async def run_load(target: Target, args: argparse.Namespace, budgets: list[int | None]):
    rounds = math.ceil(args.requests_per_budget / args.concurrency)
    total_rounds = args.warmup_rounds + rounds
    n_waves = total_rounds * len(budgets)
    print(f"making {n_waves * args.concurrency} distinct {args.image_size}px images "
          f"(seed {args.seed}) ...", file=sys.stderr, flush=True)
    images = iter(make_images(n_waves * args.concurrency, args.seed, args.image_size))

    results: list[RequestResult] = []
    waves: list[Wave] = []
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency + 2)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=target.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(args.timeout)) as client:
        wave_index = 0
        for round_ in range(total_rounds):
            warmup = round_ < args.warmup_rounds
            shift = round_ % len(budgets)
            for budget in budgets[shift:] + budgets[:shift]:
                before = await asyncio.to_thread(scrape_metrics, target.base_url)
                t0 = time.perf_counter()
                batch = await asyncio.gather(*(
                    one_request(client, target, budget, next(images), args, round_, wave_index,
                                warmup)
                    for _ in range(args.concurrency)
                ))
                wall = time.perf_counter() - t0
                after = await asyncio.to_thread(scrape_metrics, target.base_url)
                ttfts = [r.ttft_s for r in batch if r.ttft_s is not None]
                waves.append(Wave(
                    budget, round_, wave_index, warmup, wall,
                    metric_total(after, SELECTION_SUM) - metric_total(before, SELECTION_SUM),
                    metric_total(after, SELECTION_COUNT) - metric_total(before, SELECTION_COUNT),
                    max(ttfts) if ttfts else None,
                ))
                results.extend(batch)
                wave_index += 1
                failed = [r for r in batch if not r.ok]
                elapsed = time.perf_counter() - started
                eta = elapsed / wave_index * (n_waves - wave_index)
                phase = "warm-up" if warmup else f"round {round_ - args.warmup_rounds + 1}"
                e2es = [r.e2e_s for r in batch if r.e2e_s is not None]
                line = (
                    f"[wave {wave_index:>3}/{n_waves}] {phase:>8} budget {budget_label(budget):>4}"
                    f" x{args.concurrency}: TTFT {fmt(_median(ttfts), '.3f')}s"
                    f" e2e {fmt(_median(e2es), '.3f')}s prompt {batch[0].prompt_tokens}"
                )
                if failed:
                    line += f"  {len(failed)} FAILED: {failed[0].error}"
                print(f"{line}  (elapsed {elapsed:.0f}s, ~{eta:.0f}s left)", file=sys.stderr,
                      flush=True)
    return results, waves, time.perf_counter() - started


def analyse(results: list[RequestResult], waves: list[Wave], budgets: list[int | None],
            shape, args: argparse.Namespace) -> list[dict]:
    from idselect.flops import predicted_ttft_speedup

    measured = [r for r in results if not r.warmup]
    rows = []
    for budget in budgets:
        ok = [r for r in measured if r.budget == budget and r.ok]
        bad = [r for r in measured if r.budget == budget and not r.ok]
        bw = [w for w in waves if w.budget == budget and not w.warmup]
        wall = sum(w.wall_s for w in bw)
        kept = [r.visual_tokens_kept for r in ok if r.visual_tokens_kept is not None]
        original = [r.visual_tokens_original for r in ok if r.visual_tokens_original is not None]
        text_tokens = [r.prompt_tokens - (r.visual_tokens_kept or 0) for r in ok]
        out_tokens = sum(r.completion_tokens or 0 for r in ok)
        tpot = [(r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)
                for r in ok if (r.completion_tokens or 0) > 1]
        sel_s = sum(w.selection_s for w in bw)
        sel_n = sum(w.selection_images for w in bw)
        ttft_window = sum(w.max_ttft_s for w in bw if w.max_ttft_s is not None)
        rows.append({
            "budget": budget_label(budget),
            "requests": len(ok),
            "errors": len(bad),
            "first_error": bad[0].error if bad else None,
            "prompt_tokens_mean": statistics.fmean(r.prompt_tokens for r in ok) if ok else None,
            "text_tokens_mean": statistics.fmean(text_tokens) if text_tokens else None,
            "visual_tokens_kept_mean": statistics.fmean(kept) if kept else None,
            "visual_tokens_original_mean": statistics.fmean(original) if original else None,
            "output_tokens_mean": out_tokens / len(ok) if ok else None,
            "ttft_s": summary([r.ttft_s for r in ok]),
            "e2e_s": summary([r.e2e_s for r in ok]),
            "tpot_s_p50": statistics.median(tpot) if tpot else None,
            "wall_s": wall,
            "request_throughput_rps": len(ok) / wall if wall else None,
            "output_tokens_per_s": out_tokens / wall if wall else None,
            "selection": {
                "images": sel_n,
                "seconds": sel_s,
                "ms_per_image": 1e3 * sel_s / sel_n if sel_n else None,
                "pct_of_ttft": 100 * sel_s / ttft_window if ttft_window else None,
            },
        })

    full = next((row for row in rows if row["budget"] == "full"), None)
    for row, budget in zip(rows, budgets, strict=True):
        row["ttft_speedup_vs_full"] = _ratio(full, row, ("ttft_s", "p50"))
        row["ttft_speedup_mean_vs_full"] = _ratio(full, row, ("ttft_s", "mean"))
        row["e2e_speedup_vs_full"] = _ratio(full, row, ("e2e_s", "p50"))
        row["throughput_ratio_vs_full"] = (
            row["request_throughput_rps"] / full["request_throughput_rps"]
            if full and full["request_throughput_rps"] and row["request_throughput_rps"] else None
        )
        row["ttft_speedup_paired_median"] = _paired(results, budget) if full else None
        predicted = None
        if shape is not None and full and full["text_tokens_mean"] is not None:
            kept = row["visual_tokens_kept_mean"]
            text = round(full["text_tokens_mean"])
            predicted = predicted_ttft_speedup(
                shape, None if kept is None else round(kept), text_tokens=text
            )
        row["predicted_ttft_speedup"] = predicted
        row["measured_over_predicted"] = (
            row["ttft_speedup_vs_full"] / predicted
            if predicted and row["ttft_speedup_vs_full"] else None
        )
    return rows


def _ratio(full: dict | None, row: dict, key: tuple[str, str]) -> float | None:
    if not full:
        return None
    a, b = full[key[0]][key[1]], row[key[0]][key[1]]
    return a / b if a and b else None


def _paired(results: list[RequestResult], budget: int | None) -> float | None:
    """Median over rounds of (mean full TTFT in the round) / (mean budget TTFT in the round)."""
    by_round: dict[int, dict[int | None, list[float]]] = {}
    for r in results:
        if r.ok and not r.warmup:
            by_round.setdefault(r.round, {}).setdefault(r.budget, []).append(r.ttft_s)
    ratios = [
        statistics.fmean(per[None]) / statistics.fmean(per[budget])
        for per in by_round.values() if per.get(None) and per.get(budget)
    ]
    return statistics.median(ratios) if ratios else None


def targets(rows: list[dict]) -> dict | None:
    row = next((r for r in rows if r["budget"] == str(TARGET_BUDGET)), None)
    if row is None:
        return None
    ratio = row["measured_over_predicted"]
    pct = row["selection"]["pct_of_ttft"]
    return {
        "budget": TARGET_BUDGET,
        "measured_over_predicted": ratio,
        "measured_over_predicted_target": TARGET_RATIO,
        "speedup_met": None if ratio is None else ratio >= TARGET_RATIO,
        "selection_pct_of_ttft": pct,
        "selection_pct_target": TARGET_SELECTION_PCT,
        "selection_met": None if pct is None else pct <= TARGET_SELECTION_PCT,
    }


def print_table(rows: list[dict], report: dict) -> None:
    header = (
        f"{'budget':>6} {'kept':>5} {'prompt':>6} {'n':>3} {'TTFT p50':>9} {'p99':>7} "
        f"{'e2e p50':>8} {'p99':>7} {'req/s':>6} {'out tok/s':>9} {'speedup':>7} "
        f"{'paired':>6} {'pred.':>6} {'meas/pred':>9} {'sel ms/img':>10} {'sel %TTFT':>9}"
    )
    print(header)
    for r in rows:
        cells = [
            f"{r['budget']:>6}",
            f"{fmt(r['visual_tokens_kept_mean'], '.0f'):>5}",
            f"{fmt(r['prompt_tokens_mean'], '.0f'):>6}",
            f"{r['requests']:>3}",
            f"{fmt(r['ttft_s']['p50'], '.3f'):>8}s",
            f"{fmt(r['ttft_s']['p99'], '.3f'):>6}s",
            f"{fmt(r['e2e_s']['p50'], '.3f'):>7}s",
            f"{fmt(r['e2e_s']['p99'], '.3f'):>6}s",
            f"{fmt(r['request_throughput_rps'], '.3f'):>6}",
            f"{fmt(r['output_tokens_per_s'], '.1f'):>9}",
            f"{fmt(r['ttft_speedup_vs_full'], '.2f'):>6}x",
            f"{fmt(r['ttft_speedup_paired_median'], '.2f'):>5}x",
            f"{fmt(r['predicted_ttft_speedup'], '.2f'):>5}x",
            f"{fmt(r['measured_over_predicted'], '.2f'):>9}",
            f"{fmt(r['selection']['ms_per_image'], '.2f'):>10}",
            f"{fmt(r['selection']['pct_of_ttft'], '.3f'):>8}%",
        ]
        errors = f"  ({r['errors']} errors: {r['first_error']})" if r["errors"] else ""
        print(" ".join(cells) + errors)
    t = report.get("targets")
    if t:
        def verdict(met):
            return "n/a" if met is None else "MET" if met else "MISSED"
        print(
            f"\ntargets at K={t['budget']}: measured/predicted TTFT speedup "
            f"{fmt(t['measured_over_predicted'], '.2f')} (>= {t['measured_over_predicted_target']}:"
            f" {verdict(t['speedup_met'])}); selection {fmt(t['selection_pct_of_ttft'], '.3f')}% "
            f"of TTFT (<= {t['selection_pct_target']}%: {verdict(t['selection_met'])})"
        )


def plot(rows: list[dict], report: dict, path: Path) -> None:
    plt = pyplot()
    labels = [r["budget"] for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    title = (f"idselect serving benchmark: {report['server']['model']}, concurrency "
             f"{report['settings']['concurrency']}, {report['settings']['max_tokens']} output "
             f"tokens\n{describe_machine(report['machine'])}")
    fig.suptitle(title, fontsize=10)

    ax = axes[0][0]
    for key, name, offset in (("ttft_s", "TTFT", -0.2), ("e2e_s", "end-to-end", 0.2)):
        p50 = [r[key]["p50"] or 0 for r in rows]
        p99 = [r[key]["p99"] or 0 for r in rows]
        ax.bar([i + offset for i in x], p50, width=0.4, label=f"{name} p50")
        ax.errorbar([i + offset for i in x], p50,
                    yerr=[[0] * len(rows), [b - a for a, b in zip(p50, p99, strict=True)]],
                    fmt="none", ecolor="black", capsize=3)
    ax.set_xticks(x, labels)
    ax.set_xlabel("visual_token_budget")
    ax.set_ylabel("seconds (whisker: p99)")
    ax.set_title("latency")
    ax.legend()

    ax = axes[0][1]
    measured = [r["ttft_speedup_vs_full"] for r in rows]
    predicted = [r["predicted_ttft_speedup"] for r in rows]
    ax.plot(x, [m or float("nan") for m in measured], "o-", label="measured TTFT speedup (p50)")
    if any(p is not None for p in predicted):
        ax.plot(x, [p or float("nan") for p in predicted], "s--", label="FLOPs-predicted")
        ax.plot(x, [TARGET_RATIO * p if p else float("nan") for p in predicted], ":",
                color="gray", label=f"{TARGET_RATIO} x predicted (target)")
    for i, r in enumerate(rows):
        if r["measured_over_predicted"] is not None:
            ax.annotate(f"{r['measured_over_predicted']:.2f}", (i, measured[i] or 0),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("visual_token_budget")
    ax.set_ylabel("x vs full budget")
    ax.set_title("speedup (labels: measured / predicted)")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    ax.bar(x, [r["request_throughput_rps"] or 0 for r in rows], color="tab:green")
    ax.set_xticks(x, labels)
    ax.set_xlabel("visual_token_budget")
    ax.set_ylabel("requests / s", color="tab:green")
    ax2 = ax.twinx()
    ax2.plot(x, [r["output_tokens_per_s"] or 0 for r in rows], "o-", color="tab:purple")
    ax2.set_ylabel("output tokens / s", color="tab:purple")
    ax2.set_ylim(bottom=0)
    ax.set_title("throughput")

    ax = axes[1][1]
    ax.bar(x, [r["selection"]["pct_of_ttft"] or 0 for r in rows], color="tab:orange")
    ax.axhline(TARGET_SELECTION_PCT, color="red", linestyle="--",
               label=f"target {TARGET_SELECTION_PCT}% (K={TARGET_BUDGET})")
    for i, r in enumerate(rows):
        ms = r["selection"]["ms_per_image"]
        if ms is not None:
            ax.annotate(f"{ms:.1f} ms", (i, r["selection"]["pct_of_ttft"] or 0),
                        textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(x, labels)
    ax.set_xlabel("visual_token_budget")
    ax.set_ylabel("% of TTFT")
    ax.set_title("ID-Selection time in the engine (labels: per image)")
    ax.legend(fontsize=8)

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (and docs/performance.md) for how the load is shaped.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--base-url", help="a running server (default http://127.0.0.1:8000)")
    where.add_argument("--start", metavar="MODEL_DIR",
                       help="start `idselect serve MODEL_DIR` on 127.0.0.1 for the run; "
                       "'tiny' or 'realistic' write those models under models/ first")
    parser.add_argument("--server-args", default=None,
                        help="vLLM options for --start, one string (default: the options the "
                        "tiny or realistic model needs, recognised from its directory)")
    parser.add_argument("--budgets", default=",".join(budget_label(b) for b in DEFAULT_BUDGETS),
                        help="comma-separated budgets; 'full' = no budget sent "
                        "(default: %(default)s)")
    parser.add_argument("--requests-per-budget", type=int, default=8,
                        help="measured requests per budget (rounded up to whole waves)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests in flight per wave (all of one budget)")
    parser.add_argument("--warmup-rounds", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=16,
                        help="output tokens per request (ignore_eos: always exactly this many)")
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--image-size", type=int, default=336,
                        help="side of the square synthetic images (the processor resizes "
                        "to 336)")
    parser.add_argument("--seed", type=int, default=None,
                        help="image seed (default: random per run, so no image repeats a "
                        "previous run's and the server's caches never hit)")
    parser.add_argument("--model-config", default=None,
                        help="config.json / model dir / preset for the FLOPs prediction "
                        "(default: the served model's directory when it is local)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout, s")
    parser.add_argument("--out", default="out/bench-serve", help="output directory")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets)
    if args.requests_per_budget < 1 or args.concurrency < 1:
        raise SystemExit("--requests-per-budget and --concurrency must be >= 1")
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little") % 2**31
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from idselect.flops import load_shape

    machine = machine_info()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    with connect(args.base_url, args.start, args.server_args, out, args.api_key) as target:
        config = args.model_config or target.config_path()
        shape = None
        if config is not None:
            try:
                shape = load_shape(config)
            except (OSError, ValueError, KeyError) as exc:
                print(f"no FLOPs prediction: {exc}", file=sys.stderr)
        print(f"server {target.base_url}, model {target.model}; budgets "
              f"{', '.join(map(budget_label, budgets))}; {args.requests_per_budget} requests per "
              f"budget at concurrency {args.concurrency}", file=sys.stderr, flush=True)
        metrics_before = scrape_metrics(target.base_url)
        results, waves, wall = asyncio.run(run_load(target, args, budgets))
        metrics_after = scrape_metrics(target.base_url)

    rows = analyse(results, waves, budgets, shape, args)
    full_rows = [r for r in results if r.ok and r.budget is None]
    if any(r.visual_tokens_kept != r.visual_tokens_original for r in full_rows):
        print("WARNING: 'full' requests were pruned: the server has a default budget; "
              "its 'full' row is not a baseline", file=sys.stderr)
    buckets = ("full", "<=16", "<=64", "<=192", ">192")
    report = {
        "benchmark": "idselect serving benchmark",
        "version": 1,
        "started_at": started_at,
        "machine": machine,
        "server": {
            "base_url": target.base_url,
            "model": target.model,
            "started_by_benchmark": target.started,
            "server_args": target.server_args,
            "model_config": str(config) if config is not None else None,
            "flops_model": None if shape is None else {
                "name": shape.name, "vision": asdict(shape.vision), "text": asdict(shape.text)},
        },
        "settings": {
            "budgets": [budget_label(b) for b in budgets],
            "requests_per_budget": math.ceil(args.requests_per_budget / args.concurrency)
            * args.concurrency,
            "concurrency": args.concurrency,
            "warmup_rounds": args.warmup_rounds,
            "max_tokens": args.max_tokens,
            "prompt": args.prompt,
            "image_size": args.image_size,
            "seed": args.seed,
            "images": "distinct synthetic image per request (seed + index)",
            "interleaving": "waves of one budget, round-robin over budgets, order rotated "
                            "every round",
        },
        "wall_s": wall,
        "budgets": rows,
        "targets": targets(rows),
        "server_metrics": {
            "selection_seconds": metric_total(metrics_after, SELECTION_SUM)
            - metric_total(metrics_before, SELECTION_SUM),
            "selection_images": metric_total(metrics_after, SELECTION_COUNT)
            - metric_total(metrics_before, SELECTION_COUNT),
            "ttft_mean_s_by_bucket": {
                b: _hist_mean(metrics_before, metrics_after,
                              "idselect_time_to_first_token_seconds", b)
                for b in buckets
            },
            "note": "whole run including warm-up; buckets are the server's budget labels",
        },
        "waves": [asdict(w) for w in waves],
        "requests": [asdict(r) for r in results],
    }
    (out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, report, out / "serve.png")
    print(f"\n{describe_machine(machine)}; {len(results)} requests in {wall:.0f}s "
          f"(seed {args.seed})\n")
    print_table(rows, report)
    print(f"\nwrote {out / 'serve.json'} and {out / 'serve.png'}")
    return report


def _hist_mean(before: dict, after: dict, name: str, bucket: str) -> float | None:
    count = metric(after, name + "_count", budget=bucket) - metric(before, name + "_count",
                                                                   budget=bucket)
    total = metric(after, name + "_sum", budget=bucket) - metric(before, name + "_sum",
                                                                 budget=bucket)
    return total / count if count else None


if __name__ == "__main__":
    main()
