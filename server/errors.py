"""Error responses in OpenAI's shape, so every client library surfaces them the same way."""

from __future__ import annotations

from starlette.responses import JSONResponse


def openai_error_body(
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def openai_error(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    type_: str = "invalid_request_error",
) -> JSONResponse:
    return JSONResponse(
        openai_error_body(message, param=param, code=code, type_=type_), status_code=status
    )
