"""OpenAI's request rules where vLLM is looser (server/request/openai_rules.py), through the real
server
and the official `openai` client: each refusal is a 400 in OpenAI's shape naming the field, each
deliberate acceptance answers 200, and the served OpenAPI document says the same. One server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from benchmarks.soak import text_token_counter
from devtools.launch import image_data_url
from tests.conftest import make_image
from tests.robust_helpers import assert_openai_error
from tests.server_harness import EAGER, tiny_server

pytestmark = pytest.mark.engine

FULL = 576
IMAGE = image_data_url(make_image(31))
TEXT = {"type": "text", "text": "What is in the image?"}
PICTURE = {"type": "image_url", "image_url": {"url": IMAGE}}


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), *EAGER) as s:
        yield s


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def user(*parts: Any) -> dict:
    return {"role": "user", "content": list(parts)}


@dataclass
class Refusal:
    id: str
    messages: list[dict]
    param: str
    says: str
    extra: dict | None = None
    code: str = "invalid_value"


HI = {"role": "user", "content": "hi"}
REFUSALS = [
    # roles outside OpenAI's set (vLLM keeps them for custom chat templates)
    Refusal("custom role", [{"role": "narrator", "content": "hi"}], "messages[0].role", "one of"),
    Refusal("empty role", [{"role": "", "content": "hi"}], "messages[0].role", "one of"),
    Refusal("role in capitals", [HI, {"role": "User", "content": "hi"}], "messages[1].role",
            "'User'"),
    Refusal("harmony message (author, no role)",
            [{"author": {"role": "user"}, "content": [TEXT]}], "messages[0].role", "no role"),
    Refusal("tool message without tool_call_id", [HI, {"role": "tool", "content": "x"}, HI],
            "messages[1].tool_call_id", "tool_call_id"),
    Refusal("function message without name", [HI, {"role": "function", "content": "x"}, HI],
            "messages[1].name", "name"),
    # content parts an image-text model cannot use, or that are not OpenAI's
    Refusal("image_pil (in-process only; vLLM answered 500)",
            [user({"type": "image_pil", "image_pil": IMAGE}, TEXT)],
            "messages[0].content[0].type", "image_pil"),
    Refusal("image part without type (uncounted in usage)", [user({"image_url": IMAGE}, TEXT)],
            "messages[0].content[0].type", "'type'"),
    Refusal("bare string part", [user("hello", TEXT)], "messages[0].content[0]", "'type'"),
    Refusal("input_image (Responses API part)",
            [user({"type": "input_image", "image_url": IMAGE, "detail": "auto"}, TEXT)],
            "messages[0].content[0].type", "input_image"),
    Refusal("image_embeds", [user({"type": "image_embeds", "image_embeds": "AAAA"}, TEXT)],
            "messages[0].content[0].type", "image_embeds"),
    Refusal("audio_url", [user({"type": "audio_url", "audio_url": {"url": "data:,"}}, TEXT)],
            "messages[0].content[0].type", "audio_url"),
    Refusal("video_url", [user({"type": "video_url", "video_url": {"url": "data:,"}}, TEXT)],
            "messages[0].content[0].type", "video_url"),
    Refusal("input_audio (OpenAI's, not this model's)",
            [user({"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
                  TEXT)],
            "messages[0].content[0].type", "text and images", code="unsupported_value"),
    Refusal("file (OpenAI's, not this model's)",
            [user({"type": "file", "file": {"file_data": "AAAA", "filename": "a.pdf"}}, TEXT)],
            "messages[0].content[0].type", "text and images", code="unsupported_value"),
    Refusal("thinking part from the user", [user({"type": "thinking", "thinking": "x"}, TEXT)],
            "messages[0].content[0].type", "thinking"),
    Refusal("refusal part from the user", [user({"type": "refusal", "refusal": "no"}, TEXT)],
            "messages[0].content[0].type", "refusal"),
    Refusal("image in a system message",
            [{"role": "system", "content": [PICTURE, TEXT]}, HI],
            "messages[0].content[0].type", "'system'"),
    Refusal("image in an assistant message",
            [HI, {"role": "assistant", "content": [PICTURE]}, HI],
            "messages[1].content[0].type", "'assistant'"),
    Refusal("image in a tool message",
            [HI, {"role": "tool", "tool_call_id": "c1", "content": [PICTURE]}, HI],
            "messages[1].content[0].type", "'tool'"),
    # request options vLLM accepts but OpenAI refuses, or that this server cannot honour
    Refusal("n above OpenAI's 128", [HI], "n", "at most 128", extra={"n": 129}),
    Refusal("logit_bias above 100", [HI], "logit_bias", "between", extra={
        "logit_bias": {"5": 500}}),
    Refusal("audio output", [HI], "audio", "text only", extra={
        "audio": {"voice": "alloy", "format": "wav"}}, code="unsupported_parameter"),
    Refusal("modalities audio", [HI], "modalities", "text only", extra={
        "modalities": ["text", "audio"]}, code="unsupported_value"),
    Refusal("web_search_options", [HI], "web_search_options", "web search", extra={
        "web_search_options": {}}, code="unsupported_parameter"),
    Refusal("moderation", [HI], "moderation", "moderation", extra={
        "moderation": {"model": "omni-moderation-latest"}}, code="unsupported_parameter"),
    Refusal("deprecated functions", [HI], "functions", "use tools", extra={
        "functions": [{"name": "f", "parameters": {"type": "object"}}]},
        code="unsupported_parameter"),
    Refusal("deprecated function_call", [HI], "function_call", "tool_choice", extra={
        "function_call": "auto"}, code="unsupported_parameter"),
    Refusal("add_generation_prompt false after a user turn (answer role 'user')", [HI],
            "add_generation_prompt", "assistant", extra={"add_generation_prompt": False}),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[c.id for c in REFUSALS])
def test_refused_with_400_naming_the_field(client, model, server, case):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=case.messages, max_tokens=1,
                                       extra_body=case.extra)
    error = raised.value.body
    assert raised.value.status_code == 400
    assert error["param"] == case.param, error
    assert error["code"] == case.code, error
    assert case.says.lower() in error["message"].lower(), error
    # the same through plain HTTP: OpenAI's error shape exactly
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": model, "messages": case.messages, "max_tokens": 1, **(case.extra or {})})
    assert assert_openai_error(response, 400)["param"] == case.param


@dataclass
class Accepted:
    id: str
    messages: list[dict]
    extra: dict | None = None


ACCEPTED = [
    Accepted("deprecated function role (OpenAI still accepts it)",
             [HI, {"role": "function", "name": "lookup", "content": "42"}, HI]),
    Accepted("developer role", [{"role": "developer", "content": "Be brief."}, HI]),
    Accepted("assistant refusal part", [HI, {"role": "assistant", "content": [
        {"type": "refusal", "refusal": "I cannot."}]}, HI]),
    Accepted("OpenAI fields the server ignores (store, metadata, service_tier, prediction, "
             "verbosity, user)", [HI], {"store": True, "metadata": {"k": "v"},
                                        "service_tier": "auto", "verbosity": "low",
                                        "prediction": {"type": "content", "content": "x"},
                                        "user": "u-1", "modalities": ["text"]}),
    Accepted("OpenAI's caching and safety hints (ignored: vLLM caches prefixes itself)", [HI],
             {"prompt_cache_key": "k", "prompt_cache_retention": "24h",
              "safety_identifier": "hash-1"}),
    Accepted("vLLM sampling extensions", [HI], {"top_k": 5, "min_p": 0.1,
                                                "repetition_penalty": 1.1}),
    Accepted("image detail (ignored: the budget decides the cost)",
             [user({"type": "image_url", "image_url": {"url": IMAGE, "detail": "low"}}, TEXT)]),
    Accepted("n at OpenAI's maximum", [HI], {"n": 128}),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_accepted_deliberately(client, model, case):
    completion = client.chat.completions.create(model=model, messages=case.messages,
                                                max_tokens=1, extra_body=case.extra)
    assert completion.choices and completion.choices[0].message.role == "assistant"


def test_continuing_an_assistant_message_answers_as_assistant(client, model):
    """vLLM's add_generation_prompt=false stays allowed where it answers as the assistant."""
    completion = client.chat.completions.create(
        model=model, max_tokens=2, messages=[HI, {"role": "assistant", "content": "The"}],
        extra_body={"add_generation_prompt": False, "continue_final_message": True})
    assert completion.choices[0].message.role == "assistant"


def test_budget_and_usage_unchanged_by_the_rules(client, model, tiny_model_dir):
    """A system message and an image request under the rules: exact prompt size, visual usage."""
    count: Callable[[str, int], int] = text_token_counter(tiny_model_dir)
    completion = client.chat.completions.create(
        model=model, max_tokens=1, messages=[user(PICTURE, TEXT)],
        extra_body={"visual_token_budget": 24})
    usage = completion.usage.model_dump()
    assert usage["prompt_tokens"] == count(TEXT["text"], 1) + 24
    assert (usage["visual_tokens_original"], usage["visual_tokens_kept"]) == (FULL, 24)


def test_completions_endpoint_shares_the_option_rules(server, model):
    for extra, param in (({"n": 129}, "n"), ({"logit_bias": {"3": -101}}, "logit_bias")):
        response = httpx.post(server.base_url + "/v1/completions", timeout=60,
                              json={"model": model, "prompt": "hi", "max_tokens": 1, **extra})
        assert assert_openai_error(response, 400)["param"] == param


def test_served_openapi_document_says_what_the_server_accepts(server):
    schema = httpx.get(server.base_url + "/openapi.json", timeout=30).json()
    components = schema["components"]["schemas"]
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        properties = components[name]["properties"]
        assert properties["visual_token_budget"]["anyOf"][0] == {"type": "integer", "minimum": 1}
        assert properties["visual_token_importance"]["anyOf"][0]["enum"] == [
            "visual", "text", "unified", "cls"]
        assert properties["n"]["anyOf"][0]["maximum"] == 128
    messages = components["ChatCompletionRequest"]["properties"]["messages"]["items"]["anyOf"]
    names = {ref["$ref"].rsplit("/", 1)[-1] for ref in messages}
    assert "CustomChatCompletionMessageParam" not in names
    assert "ChatCompletionUserMessageParam" in names
    error = components["ErrorInfo"]["properties"]
    assert error["code"] == {"anyOf": [{"type": "string"}, {"type": "null"}]}
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "503"} <= set(responses)
