"""The main job on an embedded default: serve a tiny LLaVA built here, show what pruning saves.

`make demo` (or `python -m devtools.demo`): writes the tiny model (no download), starts
`idselect serve` on 127.0.0.1, sends the same image question at full budget and at 16 with the
official `openai` client (each budget warmed up first on another image, so the latencies compare
served requests, not first calls), prints the visual tokens, prompt sizes and latencies, then keeps
the server running
until Ctrl-C (`--no-keep-running` stops it right away). The tiny model has random weights: its
answers are gibberish; the token counts and the wiring are real.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image

from devtools.launch import TINY_MODEL_ARGS, image_message, running_server
from idselect.tiny_checkpoint import write_tiny_llava

QUESTION = "What is in the image?"


def _demo_image() -> Image.Image:
    """A synthetic picture: a sky gradient, a sun and a striped field."""
    y, x = np.mgrid[0:336, 0:336]
    img = np.zeros((336, 336, 3), dtype=np.uint8)
    img[..., 2] = 255 - y // 2
    img[..., 1] = 120 + y // 4
    img[(x - 250) ** 2 + (y - 70) ** 2 < 35**2] = (255, 220, 40)
    field = y > 220
    img[field] = (60, 150, 40)
    img[field & (x // 12 % 2 == 1)] = (120, 150, 40)
    return Image.fromarray(img)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", default="models/tiny-llava")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--keep-running", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    import openai

    model_dir = write_tiny_llava(args.model_dir)
    log_path = Path(model_dir).parent / "demo-server.log"
    print(f"tiny model: {model_dir}\nstarting idselect serve on 127.0.0.1:{args.port} "
          f"(log: {log_path}); the engine takes about a minute to start on 2 CPU cores ...")
    with running_server(model_dir, log_path, *TINY_MODEL_ARGS, port=args.port) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        image = _demo_image()
        # Warm-up: a mirrored image (no cache can serve the measured request from it).
        warm_up = image_message(QUESTION, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        messages = image_message(QUESTION, image)
        rows = []
        for budget in (None, 16):
            extra = {} if budget is None else {"visual_token_budget": budget}
            client.chat.completions.create(model=model, messages=warm_up, max_tokens=8,
                                           temperature=0, extra_body=extra)
            started = time.perf_counter()
            response = client.chat.completions.create(
                model=model, messages=messages, max_tokens=8, temperature=0, extra_body=extra)
            rows.append((budget, response.usage, time.perf_counter() - started))

        print("\nlatency: one request per budget, after a warm-up request at that budget")
        print(f"{'visual_token_budget':>20} {'visual tokens':>14} {'prompt tokens':>14} "
              f"{'latency':>9}")
        for budget, usage, seconds in rows:
            visual = f"{usage.visual_tokens_kept}/{usage.visual_tokens_original}"
            print(f"{budget or 'none (full)':>20} {visual:>14} {usage.prompt_tokens:>14} "
                  f"{seconds * 1000:>7.0f}ms")
        full, pruned = rows[0][1], rows[1][1]
        saved = full.visual_tokens_kept - pruned.visual_tokens_kept
        print(f"\nbudget 16 saved {saved} of {full.visual_tokens_kept} visual tokens "
              f"({100 * saved / full.visual_tokens_kept:.1f}%); the prompt shrank from "
              f"{full.prompt_tokens} to {pruned.prompt_tokens} tokens.")
        if args.keep_running:
            print(f"\nserver running at {server.base_url}/v1 (metrics: {server.base_url}/metrics)"
                  " - Ctrl-C stops it.")
            try:
                server.process.wait()
            except KeyboardInterrupt:
                print("\nstopping ...")


if __name__ == "__main__":
    main()
