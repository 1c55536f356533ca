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
    """The chunks vLLM 0.32 sends for one choice: its role, then by `kind`: nothing more (the
    engine aborted it before its first token: vLLM skips empty deltas, so no finish either),
    a token and an aborted finish, or a token and a finish, with SIGTERM after the finish."""
    kind = request.query_params["kind"]
    _sigterm_arrives(request)

    async def events():
        yield _chunk(delta=DeltaMessage(role="assistant", content=""))
        if kind != "aborted-before-first-token":
            yield _chunk(delta=DeltaMessage(content="Once"))
            yield _chunk(delta=DeltaMessage(content=""),
                         finish_reason="abort" if kind == "aborted" else "length")
        if kind == "finished-then-sigterm":
            engine_guard._stopping = True
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


SHUTDOWN_EVENT = {"error": {"message": engine_guard.STOPPING_MESSAGE, "type": "server_error",
                            "param": None, "code": "server_shutting_down"}}


@pytest.mark.parametrize("kind", ["aborted-before-first-token", "aborted"])
def test_a_stream_the_stopping_engine_aborted_ends_with_the_shutdown_error_event(kind):
    with client() as http:
        response = http.post(f"/v1/stream?kind={kind}&stop=1", json={})
    assert response.status_code == 200
    events = _events(response.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-2:] == [SHUTDOWN_EVENT, "data: [DONE]"]
    finishes = [e["choices"][0].get("finish_reason") for e in events if "choices" in e]
    assert not any(finishes), finishes  # the aborted finish was replaced, not passed on


@pytest.mark.parametrize("stop", ["&stop=1", ""])
def test_a_finished_stream_passes_whenever_sigterm_comes(stop):
    with client() as http:
        response = http.post(f"/v1/stream?kind=finished-then-sigterm{stop}", json={})
    events = _events(response.text)
    assert [e["choices"][0].get("finish_reason") for e in events[:-1]] == [None, None, "length"]
    assert events[-1] == "data: [DONE]"


def test_streams_and_answers_pass_untouched_while_the_engine_runs():
    with client() as http:
        aborted = http.post("/v1/stream?kind=aborted", json={})
        cut = http.post("/v1/stream?kind=aborted-before-first-token", json={})
        answer = http.post("/v1/chat/completions?finish=abort", json={})
    assert _events(aborted.text)[2]["choices"][0]["finish_reason"] == "abort"
    assert len(_events(cut.text)) == 2
    assert answer.status_code == 200  # not stopping: vLLM's answer as it is
