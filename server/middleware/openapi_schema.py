"""Make vLLM's `/openapi.json` say what `idselect serve` accepts and answers.

vLLM's document describes vLLM: it lacks our request fields (`visual_token_budget`,
`visual_token_importance`, `visual_token_selector`: generated from `idselect.options.
RequestFields`), lists message shapes we refuse (custom roles, harmony messages, see
`server.request.openai_rules`), declares errors with an integer `code` (ours and OpenAI's
are strings or null) and omits the statuses we add (401, 413, 503). `extend_schema`
rewrites the document; the middleware applies it to the response of `GET /openapi.json`, so
schema-driven clients and fuzzers (schemathesis) see the server as it is.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from idselect.options import RequestFields
from server.middleware.asgi_body import send_rewritten
from server.request.openai_rules import LOGIT_BIAS_LIMIT, MAX_CHOICES

SCHEMA_PATH = "/openapi.json"
COMPLETION_OPERATIONS = ("/v1/chat/completions", "/v1/completions")
REQUEST_SCHEMAS = ("ChatCompletionRequest", "CompletionRequest")
# Message shapes vLLM lists that the server refuses (not in OpenAI's chat API).
_REFUSED_MESSAGES = ("CustomChatCompletionMessageParam", "openai_harmony__Message")
_ADDED_ERRORS = {
    "401": "Missing or wrong API key (only when the server requires one)",
    "413": "Request body larger than --max-request-bytes",
    "503": "Server shutting down or engine unavailable",
}

OPENAI_ERROR_INFO = {
    "type": "object",
    "title": "ErrorInfo",
    "required": ["message", "type", "param", "code"],
    "properties": {
        "message": {"type": "string"},
        "type": {"type": "string"},
        "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
}


def extend_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The served document with idselect's fields, rules and error shape (changed in place)."""
    components = schema.get("components", {}).get("schemas", {})
    for name in REQUEST_SCHEMAS:
        properties = components.get(name, {}).get("properties")
        if properties is None:
            continue
        properties.update(RequestFields.json_schema_properties())
        if isinstance(properties.get("n"), dict):
            properties["n"] = {"anyOf": [{"type": "integer", "minimum": 1,
                                          "maximum": MAX_CHOICES}, {"type": "null"}]}
        properties["logit_bias"] = {"anyOf": [{"type": "object", "additionalProperties": {
            "type": "number", "minimum": -LOGIT_BIAS_LIMIT, "maximum": LOGIT_BIAS_LIMIT}},
            {"type": "null"}]}
    _openai_messages(components)
    if "ErrorInfo" in components:
        components["ErrorInfo"] = OPENAI_ERROR_INFO
    for path in COMPLETION_OPERATIONS:
        operation = schema.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        responses = operation.setdefault("responses", {})
        for status, description in _ADDED_ERRORS.items():
            responses.setdefault(status, {"description": description, "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
    return schema


def _openai_messages(components: dict[str, Any]) -> None:
    """Only OpenAI's message roles; user content parts only text and images."""
    messages = components.get("ChatCompletionRequest", {}).get("properties", {}).get("messages")
    items = messages.get("items", {}) if isinstance(messages, dict) else {}
    if isinstance(items.get("anyOf"), list):
        items["anyOf"] = [
            ref for ref in items["anyOf"]
            if ref.get("$ref", "").rsplit("/", 1)[-1] not in _REFUSED_MESSAGES
        ]
    user = components.get("ChatCompletionUserMessageParam", {}).get("properties", {})
    for variant in user.get("content", {}).get("anyOf", []):
        parts = variant.get("items", {}).get("anyOf") if variant.get("type") == "array" else None
        if isinstance(parts, list):
            variant["items"]["anyOf"] = [
                ref for ref in parts if ref.get("$ref", "").rsplit("/", 1)[-1] in (
                    "ChatCompletionContentPartTextParam", "ChatCompletionContentPartImageParam")
            ]


class OpenAPISchemaMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "").removeprefix(scope.get("root_path", ""))
        if scope["type"] != "http" or scope.get("method") != "GET" or path != SCHEMA_PATH:
            await self.app(scope, receive, send)
            return
        held: dict[str, Message] = {}
        chunks: list[bytes] = []

        async def send_extended(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 200:
                held["start"] = message
                return
            if message["type"] == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                body = json.dumps(extend_schema(json.loads(b"".join(chunks)))).encode()
                await send_rewritten(send, held.pop("start"), body)
                return
            await send(message)

        await self.app(scope, receive, send_extended)
