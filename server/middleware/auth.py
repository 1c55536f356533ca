"""Bearer-token authentication for /v1/*, answering in OpenAI's error shape.

Replaces vLLM's own middleware (whose 401 body is not OpenAI-shaped). Keys are held only as
sha256 digests and compared in constant time; neither they nor the presented token are logged.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.errors import openai_error
from server.settings import ServerSettings

GUARDED_PREFIX = "/v1"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        settings: ServerSettings = scope["app"].state.args.idselect if "app" in scope else None
        if (
            scope["type"] != "http"
            or settings is None
            or not settings.api_key_digests
            or scope.get("method") == "OPTIONS"
            or not scope["path"].removeprefix(scope.get("root_path", "")).startswith(
                GUARDED_PREFIX
            )
        ):
            await self.app(scope, receive, send)
            return
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and settings.key_matches(token.strip()):
            await self.app(scope, receive, send)
            return
        response = openai_error(
            401,
            "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
        )
        await response(scope, receive, send)
