"""An exception vLLM's app does not handle (the fuzzers found two: image_pil parts, truncation
through an image) must still be answered in OpenAI's shape on /v1, and the connection kept.

Starlette answers such exceptions in its outermost layer, past every middleware, then re-raises
(uvicorn drops the connection). The raising app here stands in for a vLLM bug not yet found.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from server.middleware.openai_errors import OpenAIErrorMiddleware


async def broken(request):
    raise AssertionError("Expected code to be unreachable")


async def fine(request):
    return JSONResponse({"ok": True})


def client() -> TestClient:
    app = Starlette(routes=[Route("/v1/chat/completions", broken, methods=["POST"]),
                            Route("/v1/models", fine), Route("/other", broken)])
    app.add_middleware(OpenAIErrorMiddleware)
    return TestClient(app, raise_server_exceptions=False)


def test_unhandled_exception_on_v1_is_an_openai_500():
    with client() as http:
        response = http.post("/v1/chat/completions", json={})
        assert response.status_code == 500
        assert response.json() == {"error": {
            "message": "The server had an error while processing your request.",
            "type": "server_error", "param": None, "code": "internal_error"}}
        assert "Expected code" not in response.text  # no internals leak
        assert http.get("/v1/models").json() == {"ok": True}


def test_paths_outside_v1_keep_starlettes_answer():
    with client() as http:
        response = http.get("/other")
        assert (response.status_code, response.text) == (500, "Internal Server Error")


def test_an_error_raised_while_the_server_stops_is_the_shutdown_503(monkeypatch):
    """On SIGTERM vLLM shuts its renderer's executor first; a request being rendered then raises
    ("cannot schedule new futures after shutdown"). Like every request the stopping server
    cannot finish, it gets the 503 that tells a client to retry elsewhere."""
    from server.middleware import engine_guard

    monkeypatch.setattr(engine_guard, "_stopping", True)  # what vLLM's shutdown call sets
    with client() as http:
        response = http.post("/v1/chat/completions", json={})
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"]["code"] == "server_shutting_down"
