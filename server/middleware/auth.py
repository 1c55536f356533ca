"""API-key authentication for /v1/*: vLLM's own check, at idselect's place in the stack.

vLLM's `AuthenticationMiddleware` (keys held as sha256 digests, compared in constant time,
`/v1` guarded, OPTIONS exempt, neither keys nor tokens logged) does the checking. What differs,
each covered by tests/test_server.py:

- where it sits: outside idselect's request layer, so an unauthenticated request gets its 401
  before any body is parsed (vLLM would add its own innermost, after idselect's layers);
- how its 401 reads: `OpenAIErrorMiddleware`, outside this one, answers vLLM's
  `{"error": "Unauthorized"}` in OpenAI's error shape.

`idselect serve` hands the keys over with `configure` before the app is built (and keeps them
from vLLM's `--api-key` so that vLLM does not add its own check as well).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from idselect.vllm_plugin.compat import api_key_middleware

_keys: tuple[str, ...] = ()


def configure(keys: list[str]) -> None:
    global _keys
    _keys = tuple(k for k in keys if k)


class ApiKeyMiddleware(api_key_middleware()):
    def __init__(self, app: ASGIApp) -> None:
        super().__init__(app, tokens=list(_keys))
        self.open = not _keys  # no key configured: the API is open

    def __call__(self, scope: Scope, receive: Receive, send: Send):
        if self.open:
            return self.app(scope, receive, send)
        return super().__call__(scope, receive, send)
