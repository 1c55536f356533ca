"""vLLM's own start-up figures with and without `--max-visual-token-budget`, per backbone.

Starts `idselect serve` on each model twice (no maximum, then `--max N`) and reads what vLLM
logs while it sizes itself: "Encoder cache will be initialized with a budget of B tokens, and
profiled with M image items of the maximum feature size", the KV cache size and "Maximum
concurrency for L tokens per request"; and compares the KV figures with `idselect capacity`'s
arithmetic (`idselect.capacity`).

    python -m benchmarks.capacity                       # every tiny backbone + the realistic model
    python -m benchmarks.capacity --models tiny-llava --max-budget 64

Images only (`--limit-mm-per-prompt '{"image": 8, "video": 0}'`): videos are not pruned, and
where a model takes them vLLM reserves for its largest video whatever the maximum.
On CPU the KV cache is what `VLLM_CPU_KVCACHE_SPACE` gives (here 1 GiB for the tiny models, 4 for
the realistic one), so the maximum changes the encoder cache and the profile, not the KV size.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.bench_common import ROOT, default_server_args, describe_machine, machine_info

IMAGES_ONLY = ["--limit-mm-per-prompt", '{"image": 8, "video": 0}']
PROFILE = re.compile(r"Encoder cache will be initialized with a budget of (\d+) tokens, and "
                     r"profiled with (\d+) (\w+) items")
KV = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per "
                r"request: ([\d.]+)x")


def _models() -> dict:
    from devtools.tiny_internvl import write_tiny_internvl
    from devtools.tiny_llava_next import write_tiny_llava_next
    from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
    from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl
    from idselect.tiny_checkpoint import write_tiny_llava

    def realistic(path: Path) -> Path:
        from benchmarks.realistic_model import write_realistic_llava

        return write_realistic_llava(path)

    # name -> (writer, extra server args, KV cache GiB, KV dtype bytes; None: the --dtype used)
    tiny = ["--dtype", "float32", "--max-model-len", "4096"]
    return {
        "tiny-llava": (write_tiny_llava, ["--dtype", "float32", "--max-model-len", "2048"], 1, 4),
        "tiny-llava-next": (write_tiny_llava_next, tiny[:2] + ["--max-model-len", "8192"], 1, 4),
        "tiny-qwen2.5-vl": (write_tiny_qwen2_5_vl, tiny, 1, 4),
        "tiny-qwen3-vl": (write_tiny_qwen3_vl, tiny, 1, 4),
        "tiny-internvl": (write_tiny_internvl, tiny, 1, 4),
        "realistic": (realistic, None, 4, None),
    }


def start_up_figures(model_dir: Path, server_args: list[str], kv_gib: float, log: Path,
                     cap: int | None) -> dict:
    from devtools.launch import running_server

    extra = [*server_args, *IMAGES_ONLY]
    if cap is not None:
        extra += ["--max-visual-token-budget", str(cap)]
    with running_server(model_dir, log, *extra, env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)},
                        startup_timeout=900):
        pass
    text = log.read_text(errors="replace")
    budget, items, modality = PROFILE.search(text).groups()
    tokens, length, concurrency = KV.search(text).groups()
    return {"encoder_budget_tokens": int(budget), "profiled_items": int(items),
            "profiled_modality": modality, "kv_cache_tokens": int(tokens.replace(",", "")),
            "max_concurrency_length": int(length.replace(",", "")),
            "max_concurrency": float(concurrency)}


def predicted_kv(model_dir: Path, kv_gib: float, dtype_bytes: int, length: int) -> dict:
    from idselect.capacity import GIB, kv_cache_tokens, load_model_memory, max_concurrency

    model = load_model_memory(model_dir)
    tokens = kv_cache_tokens(kv_gib * GIB, model.kv_bytes_per_token(dtype_bytes), 16)
    return {"kv_cache_tokens": tokens, "max_concurrency": max_concurrency(tokens, length, 16)}


def main(argv: list[str] | None = None) -> dict:
    models = _models()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(models),
                        help="comma-separated (default: %(default)s)")
    parser.add_argument("--max-budget", type=int, default=64)
    parser.add_argument("--out", default="out/bench-capacity")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models.split(","):
        write, server_args, kv_gib, dtype_bytes = models[name]
        model_dir = write(ROOT / "models" / name)
        server_args = default_server_args(model_dir) if server_args is None else server_args
        if dtype_bytes is None:  # the realistic model's dtype follows the CPU (realistic_model)
            dtype_bytes = 2 if server_args[server_args.index("--dtype") + 1] == "bfloat16" else 4
        row = {"model": name}
        for cap in (None, args.max_budget):
            label = "capped" if cap else "stock"
            what = f"--max-visual-token-budget {cap}" if cap else "no maximum"
            print(f"{name}: starting with {what} ...", file=sys.stderr, flush=True)
            row[label] = start_up_figures(model_dir, server_args, kv_gib,
                                          out / f"{name}-{label}.log", cap)
        row["predicted"] = predicted_kv(model_dir, kv_gib, dtype_bytes,
                                        row["stock"]["max_concurrency_length"])
        rows.append(row)
    lines = [
        f"| model | encoder cache budget (tokens): no max / max {args.max_budget} | images "
        "profiled: no max / max | vLLM KV cache (tokens) | `idselect capacity` KV (tokens) | "
        "max concurrency: vLLM / `idselect capacity` |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, c, p = r["stock"], r["capped"], r["predicted"]
        lines.append(
            f"| {r['model']} | {s['encoder_budget_tokens']:,} / {c['encoder_budget_tokens']:,} "
            f"| {s['profiled_items']} / {c['profiled_items']} | {s['kv_cache_tokens']:,} "
            f"| {p['kv_cache_tokens']:,} | {s['max_concurrency']:.2f} / "
            f"{p['max_concurrency']:.2f} (for {s['max_concurrency_length']:,} tokens) |")
    report = {"machine": machine_info(), "max_budget": args.max_budget, "rows": rows}
    (out / "capacity.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "capacity.md").write_text("\n".join(lines) + "\n")
    print(f"\n{describe_machine(report['machine'])}\n\n" + "\n".join(lines))
    return report


if __name__ == "__main__":
    main()
