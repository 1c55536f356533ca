"""Schema fuzzing of `idselect serve` with schemathesis: requests generated from the server's own
`/openapi.json` (vLLM's document plus idselect's fields and rules,
`server/middleware/openapi_schema.py`).

Operations: POST /v1/chat/completions and /v1/completions (schema-valid and schema-violating
bodies), GET /v1/models and /health. Chat bodies get images (a pool of `data:` URLs, valid and
not, and refused http URLs) added to or swapped into their messages. Generation cost is capped in
the generated bodies, not in the server: the real model name most of the time, `max_tokens` /
`max_completion_tokens` / `min_tokens` <= 16, `n` <= 4.

Pass: no 5xx, no transport error (reset, timeout), every /v1 error in OpenAI's shape,
schemathesis' status-code / content-type / response-schema conformance, 200 chat answers parse as
the `openai` package's ChatCompletion, streams are well-formed SSE ending in [DONE].

CI runs a bounded, seeded slice (tests/test_schema_fuzz.py). Long run (not in CI):
    .venv/bin/python -m devtools.schema_fuzz --requests 10000 --seed 16
starts a tiny-model server itself (or `--base-url URL` for a running one) and exits 1 on any
failure; `--report FILE` writes the counts and failing requests as JSON.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

MAX_TOKENS = 16
MAX_CHOICES = 4
MAX_STREAM_EVENTS = 100_000
# Share of the requests per (operation, generation mode).
PLAN = (
    ("POST /v1/chat/completions", "positive", 0.45),
    ("POST /v1/chat/completions", "negative", 0.2),
    ("POST /v1/completions", "positive", 0.2),
    ("POST /v1/completions", "negative", 0.1),
    ("GET /v1/models", "positive", 0.025),
    ("GET /health", "positive", 0.025),
)
OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
OPENAI_ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error",
                      "rate_limit_error", "server_error"}


VALID_IMAGES = ("png 336", "jpeg 64x48", "png 1x1", "png as image/jpeg")


def _png(size: tuple[int, int], color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


def image_pool() -> dict[str, str]:
    """Image URLs the generated bodies carry: valid images and broken or refused ones."""
    from devtools.media_server import bomb_png

    good = _data_url(_png((336, 336), (30, 120, 200)))
    return {
        "png 336": good,
        "jpeg 64x48": _data_url(_png((64, 48), (200, 20, 20), "JPEG"), "image/jpeg"),
        "png 1x1": _data_url(_png((1, 1), (0, 255, 0))),
        "png as image/jpeg": _data_url(_png((40, 40), (5, 5, 5)), "image/jpeg"),
        "truncated base64": good[: len(good) // 2 + 1],
        "base64 of text": _data_url(b"not an image at all " * 8),
        "not base64": "data:image/png;base64,%%%not-base64%%%",
        "not base64-encoded": "data:image/png,rawbytes",
        "empty data URL": "data:",
        "GIF header only": _data_url(b"GIF89a" + b"\0" * 32, "image/gif"),
        "decompression bomb": _data_url(bomb_png()),
        "loopback URL": "http://127.0.0.1:9/cat.png",
        "metadata URL": "http://169.254.169.254/latest/meta-data/",
        "file URL": "file:///etc/passwd",
    }


@dataclass
class FuzzReport:
    requests: int = 0
    seconds: float = 0.0
    statuses: Counter = field(default_factory=Counter)
    per_operation: Counter = field(default_factory=Counter)
    with_images: int = 0
    images_by_kind: Counter = field(default_factory=Counter)
    error_messages: Counter = field(default_factory=Counter)  # 4xx, by message start
    failures: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "seconds": round(self.seconds, 1),
            "statuses": dict(sorted(self.statuses.items())),
            "per_operation": dict(self.per_operation), "with_images": self.with_images,
            "images_by_kind": dict(self.images_by_kind),
            "top_errors": dict(self.error_messages.most_common(25)),
            "failures": self.failures[:50],
            "failure_count": len(self.failures),
        }


def _cap(body: dict[str, Any], draw_int) -> None:
    """Bound what one generated request may cost the engine (the server is not changed)."""
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > MAX_TOKENS:
            body[key] = draw_int(1, MAX_TOKENS)
    if not any(isinstance(body.get(k), int) for k in ("max_tokens", "max_completion_tokens")):
        body["max_tokens"] = draw_int(1, MAX_TOKENS)
    min_tokens = body.get("min_tokens")
    if isinstance(min_tokens, int) and not isinstance(min_tokens, bool) and min_tokens > MAX_TOKENS:
        body["min_tokens"] = MAX_TOKENS
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_CHOICES:
        body["n"] = draw_int(1, MAX_CHOICES)


def _add_images(body: dict[str, Any], data, rng, pool: dict[str, str]) -> list[str]:
    """Swap pool images into generated image parts and/or add a user message with images."""
    import hypothesis.strategies as st

    kinds: list[str] = []
    # Valid images weigh triple; a seeded uniform pick (hypothesis' own draws lean towards the
    # first choice).
    names = [n for n in sorted(pool) for _ in range(3 if n in VALID_IMAGES else 1)]

    def pick() -> str:
        return rng.choice(names)

    if data.draw(st.integers(0, 9)) < 3:  # a plain conversation under the generated options
        body["messages"] = [{"role": "user", "content": data.draw(st.text(max_size=40))}]
    messages = body.get("messages")
    if not isinstance(messages, list):
        return kinds
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        for part in content if isinstance(content, list) else ():
            url_holder = part.get("image_url") if isinstance(part, dict) else None
            if isinstance(url_holder, dict) and data.draw(st.booleans()):
                kind = pick()
                url_holder["url"] = pool[kind]
                kinds.append(kind)
    if data.draw(st.integers(0, 9)) < 6:
        count = data.draw(st.integers(1, 2))
        parts = []
        for _ in range(count):
            kind = pick()
            parts.append({"type": "image_url", "image_url": {"url": pool[kind]}})
            kinds.append(kind)
        parts.append({"type": "text", "text": data.draw(st.text(max_size=40))})
        position = data.draw(st.integers(0, len(messages)))
        messages.insert(position, {"role": "user", "content": parts})
    return kinds


def _openai_error_problem(response) -> str | None:
    try:
        payload = response.json()
    except ValueError:
        return f"error body is not JSON: {response.text[:200]!r}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(error, dict):
        return f"error body is not {{'error': {{...}}}}: {response.text[:200]!r}"
    if set(error) != OPENAI_ERROR_KEYS or error["type"] not in OPENAI_ERROR_TYPES:
        return f"error object is not OpenAI's shape: {error!r:.300}"
    if not isinstance(error["message"], str) or not error["message"]:
        return "error message is empty"
    for key in ("param", "code"):
        if error[key] is not None and not isinstance(error[key], str):
            return f"error.{key} is neither a string nor null: {error[key]!r:.80}"
    return None


def _success_problem(path: str, body: Any, response) -> str | None:
    """A 200 must be what an OpenAI client can read."""
    content_type = _header(response, "content-type")
    if getattr(response, "stream_cut_short", False):
        return "the client stopped reading the stream (schemathesis' event limit)"
    if content_type.startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e.strip()]
        if not events or events[-1].strip() != "data: [DONE]":
            return f"stream does not end with [DONE]: {response.text[-200:]!r}"
        for event in events[:-1]:
            if not event.startswith("data: "):
                return f"not an SSE data event: {event[:200]!r}"
            chunk = json.loads(event[len("data: "):])
            if "error" in chunk and _openai_error_problem(_Json(chunk)):
                return f"stream error event not in OpenAI's shape: {event[:300]!r}"
        return None
    if path == "/v1/chat/completions":
        from openai.types.chat import ChatCompletion

        payload = response.json()
        ChatCompletion.model_validate(payload)
        usage = payload.get("usage") or {}
        if not isinstance(usage.get("prompt_tokens"), int):
            return f"no usage.prompt_tokens: {usage!r:.200}"
        if "visual_tokens_kept" in usage and usage["visual_tokens_kept"] > usage.get(
                "visual_tokens_original", 0):
            return f"kept more visual tokens than the images have: {usage!r:.200}"
    elif path == "/v1/completions":
        from openai.types import Completion

        Completion.model_validate(response.json())
    return None


def _error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])[:70]
    except (ValueError, KeyError, TypeError):
        return response.text[:70]


def _header(response, name: str) -> str:
    value = response.headers.get(name, "")  # schemathesis' Response: lists of values
    return value[0] if isinstance(value, list) and value else str(value or "")


class _Json:
    """Just enough of a response for `_openai_error_problem` (a stream's error event)."""

    def __init__(self, payload: Any) -> None:
        self._payload = payload
        self.text = json.dumps(payload)

    def json(self) -> Any:
        return self._payload


def run_fuzz(base_url: str, model: str, *, requests: int, seed: int,
             timeout: float = 120, progress: bool = False) -> FuzzReport:
    """Send about `requests` generated requests, sequentially; collect every failure."""
    import hypothesis.strategies as st
    import requests as http
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [not_a_server_error, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    # schemathesis stops reading an event stream after 20 events by default (it may never end);
    # ours end, and a stream that stops short of [DONE] is exactly what to catch.
    schema.config.max_stream_events = MAX_STREAM_EVENTS
    operations = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        operations[f"{operation.method.upper()} {operation.path}"] = operation
    pool = image_pool()
    report = FuzzReport()
    session = http.Session()
    started = time.monotonic()

    def one(label: str, case, data) -> None:
        kinds: list[str] = []
        if isinstance(case.body, dict):
            if data.draw(st.integers(0, 19)) < 17:
                case.body["model"] = model
            _cap(case.body, lambda lo, hi: data.draw(st.integers(lo, hi)))
            if "chat" in label:
                rng = random.Random(f"{seed}-{report.requests}")
                kinds = _add_images(case.body, data, rng, pool)
            elif case.body.get("prompt") is None and data.draw(st.integers(0, 9)) < 7:
                case.body["prompt"] = data.draw(st.text(min_size=1, max_size=40))
        report.requests += 1
        report.per_operation[label] += 1
        if kinds:
            report.with_images += 1
            report.images_by_kind.update(kinds)
        problem = None
        try:
            response = case.call(base_url=base_url, session=session, timeout=timeout)
        except Exception as exc:  # reset, timeout: a failure like a 5xx
            report.statuses["transport error"] += 1
            problem = f"transport error: {type(exc).__name__}: {exc}"
        else:
            report.statuses[response.status_code] += 1
            try:
                case.validate_response(response, checks=checks)
                if response.status_code >= 400 and case.path.startswith("/v1"):
                    problem = _openai_error_problem(response)
                elif response.status_code == 200:
                    problem = _success_problem(case.path, case.body, response)
            except (Exception, BaseExceptionGroup) as exc:  # a check failed: keep the evidence
                problem = f"{type(exc).__name__}: {str(exc)[:1500]}"
            if problem is not None:
                problem = f"HTTP {response.status_code}: {problem}"
        if problem is None and response.status_code >= 400:
            report.error_messages[_error_message(response)] += 1
        if problem is not None:
            report.failures.append({"operation": label, "problem": problem,
                                    "body": _short_body(case.body)})
            if progress:
                print(f"schema_fuzz: FAILURE {json.dumps(report.failures[-1])[:3000]}",
                      flush=True)
        if progress and report.requests % 250 == 0:
            rate = report.requests / (time.monotonic() - started)
            print(f"schema_fuzz: {report.requests} requests ({rate:.1f}/s), "
                  f"{len(report.failures)} failures, statuses {dict(report.statuses)}",
                  flush=True)

    for index, (label, mode, share) in enumerate(PLAN):
        operation = operations[label]
        count = max(1, round(requests * share))
        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))

        fuzz = _fuzz_test(one, label, strategy, count, seed * 100 + index)
        fuzz()
        while report.per_operation[label] < count:  # no parameters: one case per run
            fuzz()
    report.seconds = time.monotonic() - started
    return report


def _fuzz_test(one, label: str, strategy, count: int, seed: int):
    """A hypothesis test sending `count` cases of `strategy`; generation only (no shrinking:
    every failure is recorded as generated, and the run goes on)."""
    import hypothesis.strategies as st
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    @hypothesis_seed(seed)
    @settings(max_examples=count, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=strategy, data=st.data())
    def fuzz(case, data) -> None:
        one(label, case, data)

    return fuzz


def _short_body(body: Any, limit: int = 100_000) -> Any:
    """The body as sent (JSON), whole unless huge: enough to replay a failure."""
    text = json.dumps(body, default=str)
    return text if len(text) <= limit else text[:limit] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--base-url", help="fuzz a running server instead of starting one")
    parser.add_argument("--report", type=Path, help="write the report as JSON here")
    args = parser.parse_args(argv)
    import signal

    import httpx

    # SIGTERM unwinds like Ctrl-C, so the server this script started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    def fuzz(base_url: str) -> FuzzReport:
        model = httpx.get(base_url + "/v1/models", timeout=30).json()["data"][0]["id"]
        return run_fuzz(base_url, model, requests=args.requests, seed=args.seed, progress=True)

    if args.base_url:
        report = fuzz(args.base_url.rstrip("/"))
    else:
        import tempfile

        from devtools.launch import TINY_MODEL_ARGS, running_server
        from idselect.tiny_checkpoint import write_tiny_llava

        work = Path(tempfile.mkdtemp(prefix="idselect-schema-fuzz-"))
        model_dir = write_tiny_llava(work / "tiny-llava")
        with running_server(model_dir, work / "server.log", *TINY_MODEL_ARGS) as server:
            report = fuzz(server.base_url)
            healthy = httpx.get(server.base_url + "/health", timeout=30).status_code == 200
            if not healthy:
                report.failures.append({"operation": "GET /health", "problem": "unhealthy after"})
    summary = report.as_dict()
    if args.report:
        args.report.write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    for failure in report.failures[:20]:
        print(json.dumps(failure)[:3000])
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
