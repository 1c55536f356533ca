"""Rewrite vLLM's error bodies on /v1/* into OpenAI's error shape, keeping status and message.

vLLM answers errors as `{"error": {"message", "type": "BadRequestError", "param", "code": 400}}`
(an exception class name as `type`, the HTTP status as `code`), and its API-key check as
`{"error": "Unauthorized"}`. OpenAI clients and dashboards expect `type` from OpenAI's small set
and `code` a string or null; this middleware maps them. Bodies that already have OpenAI's shape
(ours) pass unchanged; so do streams and successes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import openai_error
from server.middleware.asgi_body import send_rewritten
from server.middleware.engine_guard import answer_unavailable, unavailable_reason

logger = logging.getLogger("vllm.idselect.errors")  # under "vllm": vLLM's log handlers

GUARDED_PREFIX = "/v1"
OPENAI_TYPES = frozenset({
    "invalid_request_error", "authentication_error", "permission_error",
    "rate_limit_error", "server_error",
})
_STATUS_CODES = {
    401: "invalid_api_key", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
    415: "unsupported_media_type", 422: "unprocessable_entity", 429: "rate_limit_exceeded",
    501: "not_implemented", 503: "service_unavailable",
}


def openai_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    return "server_error" if status >= 500 else "invalid_request_error"


UNAUTHORIZED = "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'."


def normalise(status: int, payload: Any) -> Any:
    """OpenAI's error shape for one error payload; anything else is returned as is."""
    if not isinstance(payload, dict):
        return payload
    error = payload.get("error")
    if isinstance(error, str):  # vLLM's API-key check: {"error": "Unauthorized"}
        error = {"message": UNAUTHORIZED if status == 401 else error}
    if not isinstance(error, dict):
        return payload
    code = error.get("code")
    if error.get("type") in OPENAI_TYPES and (code is None or isinstance(code, str)):
        return payload
    if not isinstance(code, str):
        code = "model_not_found" if status == 404 and error.get("param") == "model" else (
            _STATUS_CODES.get(status)
        )
    param = error.get("param")
    message = str(error.get("message") or f"HTTP {status}")
    return {"error": {
        "message": message,
        "type": openai_type(status),
        "param": param if isinstance(param, str) else None,
        "code": code,
    }}


class OpenAIErrorMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or not path.startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        sent = {"started": False}

        async def send_normalised(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["started"] = True
                headers = dict(message.get("headers", []))
                if message["status"] >= 400 and headers.get(b"content-type", b"").startswith(
                    b"application/json"
                ):
                    held["start"] = message  # body rewritten below: its length may change
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                start = held.pop("start")
                await send_rewritten(send, start, _rewrite(start["status"], b"".join(chunks)))
                return
            await send(message)

        try:
            await self.app(scope, receive, send_normalised)
        except Exception:
            # An exception vLLM did not handle would reach Starlette's outermost error handler,
            # which answers past every middleware (vLLM's error shape) and then drops the
            # connection. Answer in OpenAI's shape here and keep the connection.
            if sent["started"]:
                raise
            reason = unavailable_reason(scope)
            if reason is not None:  # vLLM stopped under the request (SIGTERM: its renderer's
                # executor goes first, and a request being rendered raises): the 503 it would
                # have got a moment later, not a 500.
                await answer_unavailable(reason, scope, receive, send)
                return
            logger.exception("idselect: unhandled error in %s %s", scope.get("method"), path)
            await openai_error(
                500, "The server had an error while processing your request.",
                type_="server_error", code="internal_error",
            )(scope, receive, send)


def _rewrite(status: int, body: bytes) -> bytes:
    try:
        payload = json.loads(body)
    except ValueError:
        return body
    fixed = normalise(status, payload)
    return body if fixed is payload else json.dumps(fixed).encode()
