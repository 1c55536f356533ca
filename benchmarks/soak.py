"""Soak: many concurrent clients, mixed budgets, streaming and not; zero 5xx, exact token counts.

Each client loops until the deadline, sending chat requests with 1-2 images and a budget drawn
from a mix (absent, null, 1, 16, 64, 100, 575, 576, 577, 10**6), half of them streamed. Images
come from a small shared pool on purpose: vLLM caches processed images by content, so the same
image arriving at once with different budgets is exactly where one request's budget could leak
into another's. Every answer is checked against its own budget:

    prompt_tokens == text tokens (tokenizer + chat template) + images * min(K, 576)

and `usage.visual_tokens_kept/original` must agree. The server's RSS (summed over its process
tree) is sampled at the start and the end.

    python -m benchmarks.soak --duration 600 --clients 8      # the long mode: starts a tiny server
    python -m benchmarks.soak --base-url http://127.0.0.1:8000 --model-dir DIR --server-pid PID

The CI mode is tests/test_soak.py (about a minute, 6 clients). Exit status 1 on any 5xx or
mismatch.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image

FULL = 576
BUDGETS: tuple[object, ...] = ("absent", None, 1, 16, 64, 100, 575, 576, 577, 10**6)
TEXTS = ("What is in the image?", "Describe the picture in one word.",
         "Count the colours you can see, please, and be brief.")


def text_token_counter(model_dir: str | Path) -> Callable[[str, int], int]:
    """Prompt tokens of a chat request other than image placeholders, from the chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    cache: dict[tuple[str, int], int] = {}

    def count(text: str, images: int) -> int:
        if (text, images) not in cache:
            parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True,
                return_dict=False,
            )
            assert ids.count(image_id) == images
            cache[text, images] = len(ids) - images
        return cache[text, images]

    return count


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a child that just exited
            total += proc.memory_info().rss
    return total


def image_pool(size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(size):
        blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        pixels = np.kron(blocks, np.ones((56, 56, 1), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


@dataclass
class SoakReport:
    requests: int = 0
    streamed: int = 0
    statuses: Counter = field(default_factory=Counter)
    by_budget: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    clients: int = 0
    rss_start: int | None = None
    rss_end: int | None = None
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds in, bytes)
    latencies: list[float] = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500)

    def summary(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        return (
            f"soak: {self.requests} requests ({self.streamed} streamed) from {self.clients} "
            f"concurrent clients in {self.duration_s:.0f} s; statuses {dict(self.statuses)}; "
            f"5xx {self.server_errors}; token mismatches {len(self.mismatches)}; client errors "
            f"{len(self.errors)}; latency p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s; "
            f"server RSS start {_mib(self.rss_start)}, end {_mib(self.rss_end)}, peak "
            f"{_mib(max((b for _, b in self.rss_samples), default=None))}"
        )

    def rss_trace(self) -> str:
        return "RSS over time: " + ", ".join(f"{t:.0f}s {_mib(b)}" for t, b in self.rss_samples)


def _mib(size: int | None) -> str:
    return "n/a" if size is None else f"{size / 2**20:.0f} MiB"


async def _one(
    client: httpx.AsyncClient, model: str, rng: random.Random, images: list[str],
    count: Callable[[str, int], int], report: SoakReport, default_budget: int | None,
) -> None:
    budget = rng.choice(BUDGETS)
    n_images = rng.choice((1, 1, 2))
    text = rng.choice(TEXTS)
    stream = rng.random() < 0.5
    parts = [{"type": "image_url", "image_url": {"url": rng.choice(images)}}
             for _ in range(n_images)]
    body: dict = {
        "model": model, "max_tokens": rng.randint(1, 6), "temperature": 0, "stream": stream,
        "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}],
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if budget != "absent":
        body["visual_token_budget"] = budget
    effective = default_budget if budget in ("absent", None) else budget
    kept = FULL if effective is None else min(effective, FULL)
    expected = (count(text, n_images) + n_images * kept, n_images * FULL, n_images * kept)

    started = time.perf_counter()
    usage = None
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            report.errors.append(f"stream error event: {chunk['error']}")
                        usage = chunk.get("usage") or usage
        else:
            response = await client.post("/v1/chat/completions", json=body)
            status = response.status_code
            if status == 200:
                usage = response.json()["usage"]
    except httpx.HTTPError as exc:
        report.errors.append(f"{type(exc).__name__}: {exc}")
        return
    report.latencies.append(time.perf_counter() - started)
    report.requests += 1
    report.streamed += stream
    report.statuses[status] += 1
    report.by_budget[str(budget)] += 1
    if status != 200:
        return
    got = None if usage is None else (
        usage.get("prompt_tokens"), usage.get("visual_tokens_original"),
        usage.get("visual_tokens_kept"))
    if got != expected:
        report.mismatches.append(
            f"budget={budget!r} images={n_images} stream={stream}: got (prompt, original, kept)"
            f"={got}, expected {expected}"
        )


async def soak(
    base_url: str, model_dir: str | Path, *, duration_s: float, clients: int,
    server_pid: int | None = None, api_key: str | None = None, seed: int = 0,
    default_budget: int | None = None, extra_images: list[str] | None = None,
) -> SoakReport:
    """Run the soak against a server; `extra_images` adds URLs (e.g. http) to the image pool."""
    count = text_token_counter(model_dir)
    images = image_pool(6, seed) + list(extra_images or [])
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    report = SoakReport(clients=clients)
    if server_pid is not None:
        report.rss_start = tree_rss(server_pid)
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120,
                                 limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        deadline = time.monotonic() + duration_s
        started = time.monotonic()

        async def worker(index: int) -> None:
            rng = random.Random(seed * 1000 + index)
            while time.monotonic() < deadline:
                await _one(client, model, rng, images, count, report, default_budget)

        async def sample_rss() -> None:
            while server_pid is not None and time.monotonic() < deadline:
                report.rss_samples.append((time.monotonic() - started, tree_rss(server_pid)))
                await asyncio.sleep(max(5.0, duration_s / 20))

        await asyncio.gather(sample_rss(), *(worker(i) for i in range(clients)))
        report.duration_s = time.monotonic() - started
    if server_pid is not None:
        report.rss_end = tree_rss(server_pid)
        report.rss_samples.append((report.duration_s, report.rss_end))
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--base-url", help="a running server (default: start a tiny one)")
    parser.add_argument("--model-dir", help="the served model's directory (for the tokenizer)")
    parser.add_argument("--server-pid", type=int, help="the running server's pid (for RSS)")
    parser.add_argument("--api-key")
    args = parser.parse_args()

    def run(base_url: str, model_dir: str, pid: int | None) -> SoakReport:
        return asyncio.run(soak(base_url, model_dir, duration_s=args.duration,
                                clients=args.clients, server_pid=pid, api_key=args.api_key,
                                seed=args.seed))

    if args.base_url:
        if not args.model_dir:
            parser.error("--model-dir is required with --base-url")
        report = run(args.base_url, args.model_dir, args.server_pid)
    else:
        from devtools.launch import TINY_MODEL_ARGS, running_server
        from idselect.tiny_checkpoint import write_tiny_llava

        work = Path(tempfile.mkdtemp(prefix="idselect-soak-"))
        model_dir = write_tiny_llava(work / "tiny-llava")
        with running_server(model_dir, work / "server.log", *TINY_MODEL_ARGS) as server:
            report = run(server.base_url, str(model_dir), server.process.pid)
        print(f"server log: {work / 'server.log'}")
    print(report.summary())
    print(report.rss_trace())
    for line in (report.mismatches + report.errors)[:20]:
        print("  " + line)
    return 1 if report.server_errors or report.mismatches or report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
