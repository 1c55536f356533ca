"""The one exception the request checks raise: answered as an OpenAI-shaped HTTP 400."""

from __future__ import annotations


class RequestRejected(Exception):
    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code
