"""The `idselect` command: `serve` (the OpenAI server), `tiny-model` (a test/demo model) and
`flops` (what each budget costs, from the model's shape)."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: idselect COMMAND [args]

commands:
  serve MODEL [--visual-token-budget N] [vLLM options]   start the OpenAI-compatible server
  tiny-model DIR [--seed S]                              write a tiny LLaVA-1.5-shaped model
  flops [--model NAME|PATH] [--budget K ...]             FLOPs and predicted TTFT speedup per budget
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
    else:
        print(f"idselect: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
