"""ASGI middleware around vLLM's completion endpoints: options in, visual usage and metrics out.

Runs outside vLLM's app, so vLLM keeps all request handling (chat templates, streaming, tools,
errors, and the one validation of the body as vLLM's request model). On the way in this layer
parses the JSON body once, applies the rules vLLM lacks (`server.request`: each a named check),
validates the idselect options into one value, hands it to the processor through the request's
scope (`idselect.vllm_plugin.usage.request`) and vLLM one rewritten body. On the way out it adds
to `usage` (also in the final streamed chunk) the visual tokens the multimodal processor reported
for this request's images, counts the same images on `/metrics` when the response starts with
200, and records request metrics. Streamed chunks without `usage` pass unparsed.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idselect.vllm_plugin import usage as visual_usage
from server.errors import openai_error
from server.metrics import code_class, request_metrics
from server.middleware.openai_errors import normalise
from server.request.openai_rules import check_chat_request, check_completion_request
from server.request.options import OPTION_PATHS, RequestRejected, prepare
from server.settings import ServerSettings


class VisualBudgetMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or scope.get("method") != "POST" or path not in OPTION_PATHS:
            await self.app(scope, receive, send)
            return
        settings: ServerSettings = scope["app"].state.args.idselect
        started = time.perf_counter()
        status = {"code": 500}
        label = "invalid"

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            body = await _read_body(receive, settings.max_request_bytes)
            if body is None:
                await openai_error(
                    413,
                    f"request body exceeds {settings.max_request_bytes} bytes",
                    code="request_too_large",
                )(scope, receive, send_status)
                return
            try:
                payload = json.loads(body)
            except (ValueError, RecursionError) as exc:  # not JSON, or nested absurdly deep
                if _declares_json(scope):
                    await openai_error(
                        400,
                        "We could not parse the JSON body of your request: "
                        f"{_json_problem(exc)}. Send a JSON object.",
                        code="invalid_json",
                    )(scope, receive, send_status)
                    return
                payload = None  # vLLM names the wrong content type in its own 400
            try:
                if isinstance(payload, dict):
                    _CHECKS[path](payload)
                request = prepare(payload, settings, chat=path == "/v1/chat/completions")
            except RequestRejected as exc:
                await openai_error(400, str(exc), param=exc.param, code=exc.code)(
                    scope, receive, send_status
                )
                return
            if request is None:
                await self.app(scope, _replay(body, receive), send_status)
                return

            new_body = json.dumps(request.body).encode()
            scope = {**scope, "headers": _with_content_length(scope["headers"], len(new_body))}
            with visual_usage.request(request.options) as visual:
                patcher = _UsagePatcher(send_status, visual, request.stream, started)
                try:
                    await self.app(scope, _replay(new_body, receive), patcher.send)
                finally:
                    label = visual.label()
        finally:
            m = request_metrics()
            m.requests.labels(label, code_class(status["code"])).inc()
            m.duration.labels(label).observe(time.perf_counter() - started)


# OpenAI's request rules that vLLM does not enforce (server.request.openai_rules), per endpoint.
_CHECKS = {
    "/v1/chat/completions": check_chat_request,
    "/v1/completions": check_completion_request,
}


def _declares_json(scope: Scope) -> bool:
    content_type = dict(scope.get("headers", [])).get(b"content-type", b"")
    return content_type.split(b";")[0].strip().lower() == b"application/json"


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    return str(exc)[:200] or type(exc).__name__


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None once it grows past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the (rewritten) body downstream once, then pass through (disconnect detection)."""
    delivered = False

    async def replay() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _with_content_length(headers: list[tuple[bytes, bytes]], length: int) -> list:
    kept = [(k, v) for k, v in headers if k.lower() != b"content-length"]
    return [*kept, (b"content-length", str(length).encode())]


# Substrings of the only SSE events this layer changes (a usage object or an error).
_EVENT_MARKERS = (b'"usage": {', b'"usage":{', b'"error"')


class _UsagePatcher:
    """Adds visual usage to JSON responses and to every SSE chunk that carries `usage`."""

    def __init__(
        self, send: Send, visual: visual_usage.RequestScope, stream: bool, started: float
    ) -> None:
        self._send = send
        self._visual = visual
        self._images = visual.usage
        self._started = started
        self._mode = "pass"  # pass | json | sse
        self._start: Message | None = None
        self._buffer = b""
        self._first_chunk_seen = not stream

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            await self._on_start(message)
        elif message["type"] == "http.response.body":
            await self._on_body(message)
        else:
            await self._send(message)

    async def _on_start(self, message: Message) -> None:
        content_type = dict(message.get("headers", [])).get(b"content-type", b"")
        if message["status"] == 200:
            # The prompt was processed (this layer's 200s all come after processing): count
            # its images once, with exactly the numbers the response reports.
            self._images.count()
            if content_type.startswith(b"text/event-stream"):
                self._mode = "sse"
            elif content_type.startswith(b"application/json"):
                self._mode = "json"
                self._start = message  # held until the body is complete (length changes)
                return
        await self._send(message)

    async def _on_body(self, message: Message) -> None:
        chunk = message.get("body", b"")
        more = message.get("more_body", False)
        if not self._first_chunk_seen and chunk:
            self._first_chunk_seen = True
            elapsed = time.perf_counter() - self._started
            request_metrics().ttft.labels(self._visual.label()).observe(elapsed)
        if self._mode == "pass":
            await self._send(message)
        elif self._mode == "json":
            self._buffer += chunk
            if more:
                return
            body = self._patch_json(self._buffer)
            assert self._start is not None
            headers = _with_content_length(self._start.get("headers", []), len(body))
            await self._send({**self._start, "headers": headers})
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
        else:
            self._buffer += chunk
            if more:  # forward complete events only; keep a partial one for the next chunk
                complete, _, self._buffer = self._buffer.rpartition(b"\n\n")
            else:
                complete, self._buffer = self._buffer, b""
            events = [e for e in complete.split(b"\n\n") if e.strip()]
            out = b"".join(self._patch_event(e) + b"\n\n" for e in events)
            if out or not more:
                await self._send({"type": "http.response.body", "body": out, "more_body": more})

    def _patch_json(self, body: bytes) -> bytes:
        try:
            payload = json.loads(body)
        except ValueError:
            return body
        return json.dumps(self._with_usage(payload)).encode()

    def _patch_event(self, event: bytes) -> bytes:
        prefix = b"data: "
        if not event.startswith(prefix) or not any(m in event for m in _EVENT_MARKERS):
            return event  # token chunks pass unparsed: this runs once per token per choice
        try:
            payload = json.loads(event[len(prefix) :])
        except ValueError:
            return event
        if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
            # An error after the 200 (e.g. the engine died mid-stream): OpenAI's shape too.
            status = payload["error"].get("code")
            payload = normalise(status if isinstance(status, int) else 500, payload)
        return prefix + json.dumps(self._with_usage(payload)).encode()

    def _with_usage(self, payload: Any) -> Any:
        if isinstance(payload, dict) and isinstance(payload.get("usage"), dict):
            payload["usage"].update(self._images.as_usage())
        return payload
