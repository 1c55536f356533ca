"""Sending a response whose body a middleware rewrote after holding back its start message."""

from __future__ import annotations

from starlette.types import Message, Send


async def send_rewritten(send: Send, start: Message, body: bytes) -> None:
    """Send the held `http.response.start` and `body` as the whole response, Content-Length
    recomputed (the rewrite may change the length)."""
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
