"""The engine guard on vLLM's answers while the server stops, in-process.

The race these cover cannot be forced on a real server: a request the front end admitted just
before SIGTERM reaches the engine after it stopped taking work, and vLLM (`EngineCore.
_reject_add_in_shutdown`) finishes it with `finish_reason: "abort"` and no tokens, in a 200. The
routes below stand in for vLLM's handlers and answer with vLLM's own response models, serialised
as vLLM does. tests/test_faults.py runs the guard against real servers (drain, drain window
passed, engine death).
"""

from __future__ import annotations

import json

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    ChatMessage,
    DeltaMessage,
    UsageInfo,
)

from server.middleware import engine_guard

USAGE = UsageInfo(prompt_tokens=5, completion_tokens=0, total_tokens=5)


def _answer(finish_reason: str) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id="chatcmpl-1", created=1, model="m", usage=USAGE, choices=[ChatCompletionResponseChoice(
            index=0, message=ChatMessage(role="assistant", content=""),
            finish_reason=finish_reason)])


def _chunk(**choice) -> str:
    response = ChatCompletionStreamResponse(
        model="m", choices=[ChatCompletionResponseStreamChoice(index=0, **choice)])
    return f"data: {response.model_dump_json(exclude_unset=True)}\n\n"


def _sigterm_arrives(request) -> None:
    """After the guard admitted the request, while vLLM handles it."""
    if request.query_params.get("stop"):
        engine_guard._stopping = True


async def plain(request):
    finish = request.query_params["finish"]
    _sigterm_arrives(request)
    return JSONResponse(content=_answer(finish).model_dump())


async def streamed(request):
    finish = request.query_params["finish"]
    _sigterm_arrives(request)

    async def events():
        yield _chunk(delta=DeltaMessage(role="assistant", content=""))
        yield _chunk(delta=DeltaMessage(content=""), finish_reason=finish)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def client() -> TestClient:
    app = Starlette(routes=[Route("/v1/chat/completions", plain, methods=["POST"]),
                            Route("/v1/stream", streamed, methods=["POST"])])
    app.add_middleware(engine_guard.EngineGuardMiddleware)
    return TestClient(app)


@pytest.fixture(autouse=True)
def running(monkeypatch):
    monkeypatch.setattr(engine_guard, "_stopping", False)  # restored after each test


def _events(text: str) -> list[dict | str]:
    return [json.loads(e[6:]) if e.startswith("data: {") else e
            for e in text.split("\n\n") if e]


def test_an_answer_the_stopping_engine_aborted_is_the_shutdown_503():
    with client() as http:
        response = http.post("/v1/chat/completions?finish=abort&stop=1", json={})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "server_shutting_down"


def test_a_drained_answer_passes_while_stopping():
    with client() as http:
        response = http.post("/v1/chat/completions?finish=length&stop=1", json={})
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(_answer("length").model_dump()))


def test_a_stream_the_stopping_engine_aborted_ends_with_the_shutdown_error_event():
    with client() as http:
        response = http.post("/v1/stream?finish=abort&stop=1", json={})
    assert response.status_code == 200
    first, error, done = _events(response.text)
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert error == {"error": {"message": engine_guard.STOPPING_MESSAGE, "type": "server_error",
                               "param": None, "code": "server_shutting_down"}}
    assert done == "data: [DONE]"


def test_streams_pass_untouched_while_the_engine_runs():
    with client() as http:
        aborted = http.post("/v1/stream?finish=abort", json={})
        answer = http.post("/v1/chat/completions?finish=abort", json={})
    assert _events(aborted.text)[1]["choices"][0]["finish_reason"] == "abort"
    assert answer.status_code == 200  # not stopping: vLLM's answer as it is
