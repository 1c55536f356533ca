"""The `idselect` command: `serve` (the OpenAI server) and `tiny-model` (a test/demo model)."""

from __future__ import annotations

import argparse
import sys

USAGE = """usage: idselect COMMAND [args]

commands:
  serve MODEL [--visual-token-budget N] [vLLM options]   start the OpenAI-compatible server
  tiny-model DIR [--seed S]                              write a tiny LLaVA-1.5-shaped model
"""


def _tiny_model(argv: list[str]) -> None:
    from idselect.tiny_model import TinyLlavaSpec, write_tiny_llava

    parser = argparse.ArgumentParser(
        prog="idselect tiny-model",
        description="Write a tiny LLaVA-1.5-shaped model (seeded random weights) for tests/demo.",
    )
    parser.add_argument("directory")
    parser.add_argument("--seed", type=int, default=TinyLlavaSpec.seed)
    args = parser.parse_args(argv)
    path = write_tiny_llava(args.directory, TinyLlavaSpec(seed=args.seed))
    print(path)


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
    else:
        print(f"idselect: unknown command {command!r}\n\n{USAGE}", end="", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
