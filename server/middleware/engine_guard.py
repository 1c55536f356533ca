"""Answer 503 at once when the engine cannot take the request: it died, or the server is
draining for shutdown. Without this, clients get 500s (or, with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH,
requests that can never run).

vLLM's own behaviour this builds on: when the EngineCore process dies, vLLM fails in-flight
requests with a 500, marks /health 503 and stops the HTTP server a moment later; on SIGTERM it
drains in-flight requests (`--shutdown-timeout`) while new ones fail inside vLLM with a 500.

What it does not do, and this layer does, while the server stops: a request that outlasts the
drain window (or every one in flight with `--shutdown-timeout 0`) would wait forever and keep
the server from exiting; it is ended with the 503 (streamed: an error event). A request the
front end admitted just before SIGTERM reaches the engine after it stopped taking work, and
vLLM finishes it with `finish_reason: "abort"` and no tokens in a 200: it gets the 503 too
(streamed: the error event in place of the aborted finish).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idselect.vllm_plugin import compat
from server.errors import openai_error, openai_error_body

GUARDED_PREFIX = "/v1"
DEAD_MESSAGE = (
    "The inference engine of this server has stopped; the request was not completed. "
    "Retry on another instance."
)
STOPPING_MESSAGE = (
    "This server is shutting down and takes no new requests. Retry on another instance."
)

_stopping = False


def watch_shutdown(engine_client: Any) -> None:
    """Note when vLLM starts shutting the engine down (SIGTERM: drain, then exit), and end the
    requests still unanswered once the engine has stopped.

    Wraps the engine client's public `shutdown` on this one instance; vLLM's launcher calls it
    (in an executor thread) first thing when a shutdown signal arrives. Call on the event loop.
    """
    original: Callable[..., Any] = engine_client.shutdown
    fail_unfinished = compat.unfinished_request_failer(engine_client)  # resolved at start-up
    loop = asyncio.get_running_loop()

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        global _stopping
        _stopping = True
        try:
            return original(*args, **kwargs)
        finally:
            loop.call_soon_threadsafe(fail_unfinished, STOPPING_MESSAGE)

    engine_client.shutdown = shutdown


def unavailable_reason(scope: Scope) -> str | None:
    app = scope.get("app")
    client = getattr(getattr(app, "state", None), "engine_client", None)
    if client is not None and client.errored and not _stopping:
        return DEAD_MESSAGE
    return STOPPING_MESSAGE if _stopping else None


class EngineGuardMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or not path.startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        reason = unavailable_reason(scope)
        if reason is not None:
            await answer_unavailable(reason, scope, receive, send)
            return
        await self.app(scope, receive, _Guarded(scope, receive, send).send)


# vLLM yields one SSE event per body message, its JSON without spaces. These mark the events the
# guard replaces while stopping, a choice's finish, and the stream's end.
_ERROR_EVENT = b'data: {"error"'
_STREAM_FAILURES = (_ERROR_EVENT, b'"finish_reason":"abort"')
_FINISHED = b'"finish_reason":"'
_DONE = b"data: [DONE]"


class _Guarded:
    """vLLM's response to an admitted request, passed through untouched while the engine runs.

    Once it has died or is stopping: a 5xx becomes the 503 naming why; a JSON 200 in which the
    engine aborted a choice becomes the 503; a streamed error event or aborted finish becomes
    the 503's error event, and so does the end of a stream in which no choice finished (vLLM
    sends no finish for a choice the engine aborted before its first token).
    """

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._scope, self._receive, self._send = scope, receive, send
        self._replaced = False
        self._held: Message | None = None  # a JSON 200's start, while stopping
        self._body = b""
        self._finished = False  # a streamed choice finished, or the stream carried an error

    async def send(self, message: Message) -> None:
        if self._replaced:
            return
        if message["type"] == "http.response.body" and not self._finished:
            body = message.get("body", b"")
            self._finished = _FINISHED in body or body.startswith(_ERROR_EVENT)
        if not _stopping and self._held is None and not (
            message["type"] == "http.response.start" and message["status"] >= 500
        ):
            await self._send(message)  # the engine runs: nothing to look at
            return
        why = unavailable_reason(self._scope)
        if message["type"] == "http.response.start":
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            if message["status"] >= 500 and why is not None:
                await self._answer(why)  # a request the engine dropped as it stopped
            elif message["status"] == 200 and content_type.startswith(b"application/json"):
                self._held = message  # stopping: is it a drained answer or an aborted one?
            else:
                await self._send(message)
        elif message["type"] == "http.response.body" and self._held is not None:
            self._body += message.get("body", b"")
            if message.get("more_body", False):
                return
            if why is not None and _aborted(self._body):
                await self._answer(why)
                return
            await self._send(self._held)
            await self._send({**message, "body": self._body})
        elif message["type"] == "http.response.body" and why is not None:
            body = message.get("body", b"")
            error = b"data: " + json.dumps(unavailable_body(why)).encode() + b"\n\n"
            if body.startswith(b"data: ") and any(m in body for m in _STREAM_FAILURES):
                body, self._finished = error, True
            elif body.startswith(_DONE) and not self._finished:
                body, self._finished = error + body, True  # no choice finished: cut short
            await self._send({**message, "body": body})
        else:
            await self._send(message)

    async def _answer(self, why: str) -> None:
        self._replaced = True
        await answer_unavailable(why, self._scope, self._receive, self._send)


def _aborted(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    choices = payload.get("choices") if isinstance(payload, dict) else None
    return isinstance(choices, list) and any(
        isinstance(c, dict) and c.get("finish_reason") == "abort" for c in choices
    )


def _code(message: str) -> str:
    return "engine_unavailable" if message is DEAD_MESSAGE else "server_shutting_down"


def unavailable_body(message: str) -> dict:
    return openai_error_body(message, code=_code(message), type_="server_error")


async def answer_unavailable(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    response = openai_error(503, message, code=_code(message), type_="server_error")
    response.headers["Retry-After"] = "1"
    await response(scope, receive, send)
