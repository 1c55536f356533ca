"""Serving benchmark: what each visual token budget does to throughput and latency under load,
against stock vLLM in the same run.

The load is vLLM's own serving benchmark (`vllm.benchmarks.serve`: its `random-mm` dataset, one
distinct random 336 x 336 image per request, fixed text and output lengths with `ignore_eos`,
`--max-concurrency` requests in flight, warm-up requests first). This module adds what it lacks:

- the servers: stock vLLM (`VLLM_PLUGINS=none`, vLLM's own OpenAI server: genuinely no plugin)
  and `idselect serve`, on the same model and engine options, one after the other;
- the sweep: every concurrency, every budget (`visual_token_budget` as an extra body field; the
  stock server runs the full images only), with the visual tokens the server reports it kept;
- the FLOPs model's predicted time-to-first-token speedup per budget (`idselect.flops`);
- the regression check: idselect at full budget keeps at least `--min-stock-ratio` (0.95) of
  stock vLLM's requests/s at every concurrency (`--check` makes a miss exit 1);
- tables (markdown), a JSON report and a plot.

    python -m benchmarks.serve --start realistic                 # the figures in the docs
    python -m benchmarks.serve --start tiny --concurrency 16 --budgets full,16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from benchmarks.bench_common import (
    budget_label,
    default_server_args,
    describe_machine,
    fmt,
    machine_info,
    metric_total,
    parse_budgets,
    pyplot,
    resolve_start_model,
    scrape_metrics,
)

DEFAULT_BUDGETS = "full,192,64,16"
DEFAULT_CONCURRENCY = "1,8,16"
# vLLM's percentiles, and the metrics reported per cell.
PERCENTILES = (50, 99)
IMAGES = "idselect_images_total"
KEPT = "idselect_visual_tokens_kept_total"
SELECTION_SUM = "idselect_selection_seconds_sum"
SELECTION_COUNT = "idselect_selection_seconds_count"


def bench_args(base_url: str, model: str, served_name: str, args: argparse.Namespace,
               concurrency: int, budget: int | None) -> list[str]:
    """The command line of `vllm bench serve` for one cell."""
    argv = [
        "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
        "--base-url", base_url, "--model", served_name, "--tokenizer", model,
        "--dataset-name", "random-mm", "--random-mm-base-items-per-request", "1",
        "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
        "--random-mm-bucket-config", "{(336, 336, 1): 1.0}",
        "--random-input-len", str(args.input_len), "--random-output-len", str(args.max_tokens),
        "--random-range-ratio", "0", "--ignore-eos",
        "--num-prompts", str(max(args.num_prompts, concurrency)),
        "--max-concurrency", str(concurrency), "--request-rate", "inf",
        "--num-warmups", str(args.warmups),
        "--percentile-metrics", "ttft,e2el",
        "--metric-percentiles", ",".join(map(str, PERCENTILES)),
        "--seed", str(args.seed + concurrency), "--disable-tqdm",
    ]
    if budget is not None:
        argv += ["--extra-body", json.dumps({"visual_token_budget": budget})]
    return argv


def run_cell(argv: list[str]) -> dict:
    """One `vllm bench serve` run, in this process; its result dictionary."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    return bench_main(parser.parse_args(argv))


@contextmanager
def started(kind: str, model_dir: Path, server_args: list[str], out: Path):
    from devtools.launch import running_server

    log = out / f"server-{kind}.log"
    print(f"starting {kind} server on {model_dir} {' '.join(server_args)} (log: {log}) ...",
          file=sys.stderr, flush=True)
    with running_server(model_dir, log, *server_args, stock=kind == "stock",
                        startup_timeout=900) as server:
        yield server


def measure(kind: str, base_url: str, model_dir: Path, args: argparse.Namespace,
            budgets: list[int | None]) -> list[dict]:
    """Every (concurrency, budget) cell against one server."""
    import httpx

    served = httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
    rows = []
    for concurrency in args.concurrency:
        for budget in budgets if kind == "idselect" else [None]:
            before = scrape_metrics(base_url)
            result = run_cell(bench_args(base_url, str(model_dir), served, args, concurrency,
                                         budget))
            after = scrape_metrics(base_url)
            delta = {name: metric_total(after, name) - metric_total(before, name)
                     for name in (IMAGES, KEPT, SELECTION_SUM, SELECTION_COUNT)}
            row = {
                "server": kind, "concurrency": concurrency, "budget": budget_label(budget),
                "completed": result["completed"], "failed": result.get("failed", 0),
                "requests_per_s": result["request_throughput"],
                "output_tokens_per_s": result["output_throughput"],
                "prompt_tokens_mean": result["total_input_tokens"] / max(result["completed"], 1),
                **{f"{m}_p{p}_ms": result.get(f"p{p}_{m}_ms") for m in ("ttft", "e2el")
                   for p in PERCENTILES},
                # what the server reports each image kept (warm-up requests included)
                "visual_tokens_kept_per_image": (delta[KEPT] / delta[IMAGES]
                                                 if delta[IMAGES] else None),
                "selection_ms_per_image": (1e3 * delta[SELECTION_SUM] / delta[SELECTION_COUNT]
                                           if delta[SELECTION_COUNT] else None),
            }
            rows.append(row)
            print(f"[{kind} c={concurrency} {row['budget']}] {row['requests_per_s']:.2f} req/s, "
                  f"TTFT p50 {fmt(row['ttft_p50_ms'], '.0f')} ms, "
                  f"{row['failed']} failed", file=sys.stderr, flush=True)
    return rows


def predicted_speedups(model_dir: Path, budgets: list[int | None], text_tokens: int) -> dict:
    """The FLOPs model's TTFT speedup over the full budget, per budget label."""
    from idselect.flops import load_shape, report

    try:
        shape = load_shape(model_dir / "config.json")
    except (OSError, ValueError, KeyError) as exc:
        print(f"no FLOPs prediction: {exc}", file=sys.stderr)
        return {}
    full = report(shape, None, text_tokens).prefill_total
    return {budget_label(b): full / report(shape, b, text_tokens).prefill_total for b in budgets}


def stock_ratios(rows: list[dict]) -> dict[int, float | None]:
    """idselect at full budget / stock vLLM, requests/s, per concurrency."""
    out = {}
    for concurrency in sorted({r["concurrency"] for r in rows}):
        cell = {r["server"]: r["requests_per_s"] for r in rows
                if r["concurrency"] == concurrency and r["budget"] == "full"}
        out[concurrency] = (cell["idselect"] / cell["stock"]
                            if cell.get("stock") and "idselect" in cell else None)
    return out


def missed(ratios: dict[int, float | None], minimum: float) -> list[int]:
    """The concurrencies at which idselect at full budget fell below `minimum` x stock."""
    return sorted(c for c, r in ratios.items() if r is not None and r < minimum)


def table(rows: list[dict], predicted: dict) -> str:
    stock = {r["concurrency"]: r for r in rows if r["server"] == "stock"}
    lines = [
        "| server | in flight | budget | kept/image | req/s | vs stock | output tok/s | "
        "TTFT p50 / p99 (ms) | end-to-end p50 / p99 (ms) | predicted TTFT speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = stock.get(r["concurrency"])
        ratio = r["requests_per_s"] / base["requests_per_s"] if base else None
        lines.append(
            f"| {'stock vLLM' if r['server'] == 'stock' else 'idselect'} | {r['concurrency']} "
            f"| {r['budget']} | {fmt(r['visual_tokens_kept_per_image'], '.0f')} "
            f"| {r['requests_per_s']:.2f} | {fmt(ratio, '.2f')}x "
            f"| {r['output_tokens_per_s']:.1f} "
            f"| {fmt(r['ttft_p50_ms'], '.0f')} / {fmt(r['ttft_p99_ms'], '.0f')} "
            f"| {fmt(r['e2el_p50_ms'], '.0f')} / {fmt(r['e2el_p99_ms'], '.0f')} "
            f"| {fmt(predicted.get(r['budget']) if r['server'] == 'idselect' else None, '.2f')} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[str, list[dict]] = {}
    for r in rows:
        name = "stock vLLM" if r["server"] == "stock" else f"idselect {r['budget']}"
        series.setdefault(name, []).append(r)
    for name, points in series.items():
        points.sort(key=lambda r: r["concurrency"])
        style = {"color": "black", "linestyle": "--"} if name.startswith("stock") else {}
        xs = [r["concurrency"] for r in points]
        left.plot(xs, [r["requests_per_s"] for r in points], marker="o", label=name, **style)
        right.plot(xs, [r["ttft_p50_ms"] for r in points], marker="o", label=name, **style)
    left.set(xlabel="requests in flight", ylabel="requests / s", title="throughput")
    right.set(xlabel="requests in flight", ylabel="ms", title="time to first token, p50")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--start", required=True, metavar="MODEL",
                        help="'tiny', 'realistic' (written under models/ first) or a model dir")
    parser.add_argument("--server-args", default=None,
                        help="engine options for both servers, one string (default: what the "
                        "tiny or realistic model needs)")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS,
                        help="comma-separated; 'full' = no budget sent (default: %(default)s)")
    parser.add_argument("--concurrency", default=DEFAULT_CONCURRENCY,
                        type=lambda t: [int(c) for c in t.split(",")],
                        help="requests in flight, comma-separated (default: %(default)s)")
    parser.add_argument("--num-prompts", type=int, default=16,
                        help="measured requests per cell (at least the concurrency)")
    parser.add_argument("--warmups", type=int, default=1,
                        help="warm-up requests before each cell (not measured)")
    parser.add_argument("--input-len", type=int, default=32, help="text tokens per request")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stock", dest="stock", action="store_false",
                        help="skip the stock vLLM baseline")
    parser.add_argument("--min-stock-ratio", type=float, default=0.95,
                        help="idselect at full budget must keep this share of stock's req/s")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when the stock ratio is missed at any concurrency")
    parser.add_argument("--out", default="out/bench-serve", help="output directory")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if isinstance(args.concurrency, str):
        args.concurrency = [int(c) for c in args.concurrency.split(",")]
    budgets = parse_budgets(args.budgets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_start_model(args.start)
    import shlex

    server_args = (shlex.split(args.server_args) if args.server_args is not None
                   else default_server_args(model_dir))
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    machine = machine_info()
    rows: list[dict] = []
    for kind in ("stock", "idselect") if args.stock else ("idselect",):
        with started(kind, model_dir, server_args, out) as server:
            rows += measure(kind, server.base_url, model_dir, args, budgets)
    predicted = predicted_speedups(model_dir, budgets, args.input_len)
    ratios = stock_ratios(rows) if args.stock else {}
    misses = missed(ratios, args.min_stock_ratio)
    report = {
        "benchmark": "idselect serving benchmark (vllm bench serve)", "version": 2,
        "started_at": started_at, "machine": machine,
        "model": str(model_dir), "server_args": server_args,
        "settings": {k: v for k, v in vars(args).items() if k not in ("start", "out")},
        "rows": rows, "predicted_ttft_speedup": predicted,
        "stock_ratio": {"min": args.min_stock_ratio, "by_concurrency": ratios,
                        "missed": misses},
    }
    (out / "serve.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = table(rows, predicted)
    (out / "serve.md").write_text(markdown + "\n")
    plot(rows, out / "serve.png")
    print(f"\n{describe_machine(machine)}; {started_at}\n\n{markdown}\n")
    if ratios:
        verdict = "MISSED at " + ", ".join(map(str, misses)) if misses else "met"
        cells = ", ".join(f"{c} in flight {fmt(r, '.2f')}x" for c, r in ratios.items())
        print(f"idselect full / stock req/s: {cells}; target >= {args.min_stock_ratio}: "
              f"{verdict}")
    print(f"wrote {out / 'serve.json'}, {out / 'serve.md'} and {out / 'serve.png'}")
    if args.check and misses:
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    main()
