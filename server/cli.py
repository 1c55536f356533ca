"""The `idselect` command: `serve` (the OpenAI server), `tiny-model` (a test/demo model),
`flops` (what each budget costs, from the model's shape) and `capacity` (how many requests fit
on a GPU per budget)."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: idselect COMMAND [args]

commands:
  serve MODEL [--visual-token-budget N] [vLLM options]   start the OpenAI-compatible server
  tiny-model DIR [--seed S]                              write a tiny LLaVA-1.5-shaped model
  flops [--model NAME|PATH] [--budget K ...]             FLOPs and predicted TTFT speedup per budget
  capacity [--model NAME|PATH] [--max-budget N ...]      one-image requests that fit on a GPU
"""


def _tiny_model(argv: list[str]) -> None:
    from idselect.tiny_checkpoint import TinyLlavaSpec, write_tiny_llava

    parser = argparse.ArgumentParser(
        prog="idselect tiny-model",
        description="Write a tiny LLaVA-1.5-shaped model (seeded random weights) for tests/demo.",
    )
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=TinyLlavaSpec.seed)
    args = parser.parse_args(argv)
    path = write_tiny_llava(args.directory, TinyLlavaSpec(seed=args.seed))
    print(path)


def _budget(text: str) -> int | None:
    if text.lower() in ("full", "none"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"budget must be >= 1 or 'full', got {value}")
    return value


def _flops(argv: list[str]) -> None:
    from idselect.flops import DEFAULT_BUDGETS, PRESETS, load_shape, table

    parser = argparse.ArgumentParser(
        prog="idselect flops",
        description="Vision encoder, projector and language model FLOPs of one image request per "
        "visual token budget, and the time-to-first-token speedup they predict.",
    )
    parser.add_argument(
        "--model",
        default="llava-1.5-7b",
        help=f"a preset ({', '.join(PRESETS)}), a config.json or a model directory "
        "(default: llava-1.5-7b)",
    )
    parser.add_argument(
        "--budget",
        type=_budget,
        nargs="+",
        default=list(DEFAULT_BUDGETS),
        metavar="K",
        help="budgets to show ('full' or integers >= 1; default: full 192 128 64 32 16)",
    )
    parser.add_argument(
        "--text-tokens", type=int, default=64, help="text tokens in the prompt (default 64)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    try:
        shape = load_shape(args.model)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    budgets = args.budget if None in args.budget else [None, *args.budget]
    if args.json:
        import json

        from idselect.flops import predicted_ttft_speedup, report

        rows = [
            {
                **report(shape, b, args.text_tokens).as_dict(),
                "predicted_ttft_speedup": predicted_ttft_speedup(shape, b, args.text_tokens),
            }
            for b in budgets
        ]
        print(json.dumps({"model": shape.name, "rows": rows}, indent=2))
    else:
        print(table(shape, budgets, args.text_tokens))


def _capacity(argv: list[str]) -> None:
    from idselect.capacity import GPU, PRESETS, load_model_memory, table

    parser = argparse.ArgumentParser(
        prog="idselect capacity",
        description="One-image requests whose KV cache fits on a GPU at once, per visual token "
        "budget and maximum budget (idselect/capacity.py: what is computed and what is assumed).",
    )
    parser.add_argument("--model", default="llava-1.5-7b",
                        help=f"a preset ({', '.join(PRESETS)}), a config.json or a model directory")
    parser.add_argument("--budget", type=_budget, nargs="+", default=[None, 192, 64, 16],
                        metavar="K", help="budgets requests send ('full': none; default: full "
                        "192 64 16)")
    parser.add_argument("--max-budget", type=_budget, nargs="+", default=[None, 64],
                        metavar="N", help="the server's --max-visual-token-budget ('full': none; "
                        "default: full 64)")
    parser.add_argument("--image", default="1024x1024", help="image size WxH (Qwen-VL counts "
                        "depend on it; default 1024x1024)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=256)
    parser.add_argument("--gpu-memory-gib", type=float, default=GPU.memory_gib)
    parser.add_argument("--gpu-memory-utilization", type=float, default=GPU.utilization)
    parser.add_argument("--dtype-bytes", type=int, default=GPU.dtype_bytes)
    parser.add_argument("--overhead-gib", type=float, default=GPU.overhead_gib,
                        help="activations, CUDA graphs, allocator (assumed; default %(default)s)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=GPU.max_num_batched_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=GPU.max_num_seqs)
    parser.add_argument("--block-size", type=int, default=GPU.block_size)
    args = parser.parse_args(argv)
    try:
        model = load_model_memory(args.model)
        width, height = (int(v) for v in args.image.lower().split("x"))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        parser.error(str(exc))
    gpu = GPU(args.gpu_memory_gib, args.gpu_memory_utilization, args.dtype_bytes,
              args.overhead_gib, args.block_size, args.max_num_batched_tokens, args.max_num_seqs)
    print(table(model, gpu, args.budget, args.max_budget, (width, height), args.text_tokens,
                args.output_tokens))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from server.serve import main as serve

        serve(rest)
    elif command == "tiny-model":
        _tiny_model(rest)
    elif command == "flops":
        _flops(rest)
    elif command == "capacity":
        _capacity(rest)
    else:
        print(f"idselect: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
