"""The accuracy benchmark's figure: scores and retention per budget, or, with selectors,
retention vs K per selector (95% interval bars) and the per-kind scores at the smallest K."""

from __future__ import annotations

from pathlib import Path

from benchmarks.bench_common import pyplot


def plot(rows: list[dict], report: dict, path: Path) -> None:
    plt = pyplot()
    if any(r["selector"] for r in rows):
        return plot_selectors(plt, rows, report, path)
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


def plot_selectors(plt, rows: list[dict], report: dict, path: Path) -> None:
    """Left: exact match as % of full vs K, one line per selector (95% bootstrap intervals).
    Right: exact match per question kind at the smallest budget, per selector."""
    selectors = list(dict.fromkeys(r["selector"] for r in rows if r["selector"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    fig.suptitle(f"accuracy retention by selector: {report['server']['model']} "
                 f"({report['data']['questions']} questions)", fontsize=10)
    for selector in selectors:
        mine = sorted((r for r in rows if r["selector"] == selector),
                      key=lambda r: int(r["budget"]))
        ks = [int(r["budget"]) for r in mine]
        ys = [r["exact_match_pct_of_full"] or 0.0 for r in mine]
        cis = [r["exact_match_pct_of_full_ci95"] or [y, y] for r, y in zip(mine, ys, strict=True)]
        errors = [[y - c[0] for y, c in zip(ys, cis, strict=True)],
                  [c[1] - y for y, c in zip(ys, cis, strict=True)]]
        left.errorbar(ks, ys, yerr=errors, marker="o", capsize=3, label=selector)
    left.axhline(100, color="gray", linestyle=":")
    left.set_xscale("log", base=2)
    left.set_xlabel("visual_token_budget K (log scale)")
    left.set_ylabel("exact match, % of the full budget")
    left.set_title("retention vs K")
    left.legend()
    smallest = min(int(r["budget"]) for r in rows if r["selector"])
    kinds = sorted({k for r in rows for k in r["exact_match_by_kind"]})
    width = 0.8 / max(1, len(selectors))
    for j, selector in enumerate(selectors):
        row = next(r for r in rows if r["selector"] == selector
                   and int(r["budget"]) == smallest)
        values = [row["exact_match_by_kind"].get(k, {}).get("exact_match", 0.0) for k in kinds]
        right.bar([i + (j - (len(selectors) - 1) / 2) * width for i in range(len(kinds))],
                  values, width=width, label=selector)
    full = next((r for r in rows if r["budget"] == "full"), None)
    if full:
        right.scatter(range(len(kinds)), [full["exact_match_by_kind"].get(k, {}).get(
            "exact_match", 0.0) for k in kinds], marker="_", s=400, color="black",
            label="full", zorder=3)
    right.set_xticks(range(len(kinds)), kinds)
    right.set_ylabel("exact match (%)")
    right.set_title(f"per question kind at K={smallest}")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
