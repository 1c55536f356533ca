"""Answer 503 at once when the engine cannot take the request: it died, or the server is
draining for shutdown. Without this, clients get 500s (or, with VLLM_KEEP_ALIVE_ON_ENGINE_DEATH,
requests that can never run).

vLLM's own behaviour this builds on: when the EngineCore process dies, vLLM fails in-flight
requests with a 500, marks /health 503 and stops the HTTP server a moment later; on SIGTERM it
drains in-flight requests (`--shutdown-timeout`) while new ones fail inside vLLM with a 500.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import openai_error

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
    """Note when vLLM starts shutting the engine down (SIGTERM: drain, then exit).

    Wraps the engine client's public `shutdown` on this one instance; vLLM's launcher calls it
    first thing when a shutdown signal arrives.
    """
    original: Callable[..., Any] = engine_client.shutdown

    def shutdown(*args: Any, **kwargs: Any) -> Any:
        global _stopping
        _stopping = True
        return original(*args, **kwargs)

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
        replaced = False

        async def send_guarded(message: Message) -> None:
            nonlocal replaced
            if message["type"] == "http.response.start" and message["status"] == 500:
                why = unavailable_reason(scope)  # a request the engine dropped as it stopped
                if why is not None:
                    replaced = True
                    await answer_unavailable(why, scope, receive, send)
            if not replaced:
                await send(message)

        await self.app(scope, receive, send_guarded)


async def answer_unavailable(message: str, scope: Scope, receive: Receive, send: Send) -> None:
    code = "engine_unavailable" if message is DEAD_MESSAGE else "server_shutting_down"
    response = openai_error(503, message, code=code, type_="server_error")
    response.headers["Retry-After"] = "1"
    await response(scope, receive, send)
