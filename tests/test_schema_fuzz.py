"""Schema fuzzing in CI: a bounded, seeded schemathesis run (devtools/schema_fuzz.py) against a
real server on the tiny model, then the server must be healthy and answer a valid pruned request
with the exact prompt size. Also the inputs schema fuzzing found, through the same server.

The long run (>= 10,000 requests, not in CI): `.venv/bin/python devtools/schema_fuzz.py`.
"""

from __future__ import annotations

import httpx
import pytest

from benchmarks.soak import text_token_counter
from devtools.schema_fuzz import image_pool, run_fuzz
from tests.robust_helpers import assert_openai_error
from tests.server_harness import EAGER, tiny_server

pytestmark = pytest.mark.engine

REQUESTS = 1200
SEED = 16
FULL = 576
QUESTION = "Describe the picture."


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), *EAGER) as s:
        yield s


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.base_url + "/v1/models", timeout=30).json()["data"][0]["id"]


def image_chat(model: str, **extra) -> dict:
    return {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_pool()["png 336"]}},
        {"type": "text", "text": QUESTION}]}], **extra}


def test_generated_requests_get_no_5xx_and_match_the_schema(server, model, tiny_model_dir):
    report = run_fuzz(server.base_url, model, requests=REQUESTS, seed=SEED)
    summary = report.as_dict()
    print({k: v for k, v in summary.items() if k != "failures"})
    assert not report.failures, report.failures[:5]
    assert report.requests >= REQUESTS
    assert not any(str(s).startswith("5") for s in report.statuses), report.statuses
    # the run went deep: answers, refusals, and images of every kind in the bodies
    assert report.statuses[200] >= REQUESTS // 20 and report.statuses[400] >= REQUESTS // 5
    assert report.with_images >= REQUESTS // 4
    assert set(report.images_by_kind) == set(image_pool())

    assert httpx.get(server.base_url + "/health", timeout=30).status_code == 200
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                          json=image_chat(model, visual_token_budget=20))
    assert response.status_code == 200, response.text[:500]
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == text_token_counter(tiny_model_dir)(QUESTION, 1) + 20
    assert (usage["visual_tokens_original"], usage["visual_tokens_kept"]) == (FULL, 20)


@pytest.mark.parametrize("truncate", [1, 20, 600, -1])
def test_truncating_a_prompt_with_images_is_a_400(server, model, truncate):
    """Found by schemathesis: vLLM cut through the image's placeholder tokens and answered 500
    (then dropped the connection)."""
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                          json=image_chat(model, truncate_prompt_tokens=truncate))
    error = assert_openai_error(response, 400)
    assert error["param"] == "truncate_prompt_tokens"
    assert "images" in error["message"]


def test_truncating_a_text_prompt_still_works(server, model):
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 1, "truncate_prompt_tokens": 4,
        "messages": [{"role": "user", "content": "one two three four five six seven"}]})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["prompt_tokens"] == 4


@pytest.mark.parametrize("penalty", [-6.471734866310722e16, 1e300, -11])
def test_beam_search_with_an_absurd_length_penalty_is_a_400(server, model, penalty):
    """Found by schemathesis: vLLM divided by seq_len ** -6e16 == 0.0 and answered 500."""
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 3, "use_beam_search": True, "n": 2,
        "length_penalty": penalty, "messages": [{"role": "user", "content": "hello"}]})
    assert assert_openai_error(response, 400)["param"] == "length_penalty"


def test_beam_search_with_a_sane_length_penalty_answers(server, model):
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 3, "use_beam_search": True, "n": 2,
        "length_penalty": -2.0, "messages": [{"role": "user", "content": "hello"}]})
    assert response.status_code == 200, response.text[:300]
    assert len(response.json()["choices"]) == 2


@pytest.mark.parametrize("field,value", [
    ("structured_outputs", [1]), ("structured_outputs", "json"),
])
def test_bodies_that_crash_vllms_validators_are_a_400(server, model, field, value):
    """Found by schemathesis: vLLM's pre-validation hook called `.get` on a list (500). Every
    such field: tests/test_vllm_request_rules.py."""
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 1, field: value,
        "messages": [{"role": "user", "content": "hello"}]})
    error = assert_openai_error(response, 400)
    assert error["param"] == field and "must be an object" in error["message"], error


def test_ordinary_validation_errors_keep_vllms_own_400(server, model):
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 1, "tools": [],
        "messages": [{"role": "user", "content": "hello"}]})
    error = assert_openai_error(response, 400)
    assert "`tools` must not be an empty array" in error["message"], error


@pytest.mark.parametrize("field", ["top_k", "stream_interval"])
def test_integers_beyond_the_engines_range_are_a_400(server, model, field):
    """Found by schemathesis: stream_interval = 32589158477190044731 failed the engine's msgpack
    serialisation (500 "HTTP 500"); so did top_k = 2**64."""
    for path, body in (("/v1/completions", {"prompt": "0"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})):
        response = httpx.post(server.base_url + path, timeout=120, json={
            "model": model, "max_tokens": 2, field: 32589158477190044731, **body})
        assert assert_openai_error(response, 400)["param"] == field
    response = httpx.post(server.base_url + "/v1/completions", timeout=120, json={
        "model": model, "max_tokens": 2, "prompt": "0", field: 2**64 - 1})
    assert response.status_code == 200, response.text[:300]  # the edge of the range still works


@pytest.mark.parametrize("field,value,param", [
    ("stop_token_ids", [7, 2**64], "stop_token_ids[1]"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "integer", "maximum": 2**70}}}, "response_format.json_schema.schema.maximum"),
])
def test_nested_integers_beyond_the_engines_range_are_a_400(server, model, field, value, param):
    """The same msgpack failure one level down (checked against vLLM's own encoder: both reach
    the engine as SamplingParams and failed its serialisation): refused wherever they sit."""
    response = httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 2, field: value,
        "messages": [{"role": "user", "content": "x"}]})
    assert assert_openai_error(response, 400)["param"] == param


def test_a_completions_body_with_stray_image_parts_is_no_500(server, model):
    """Found by atheris: a non-string part `type` in a /v1/completions body's `messages` (a field
    vLLM ignores there) crashed our image count; such parts never counted as images either."""
    response = httpx.post(server.base_url + "/v1/completions", timeout=120, json={
        "model": model, "prompt": "hello", "max_tokens": 1, "messages": [{"role": "user",
        "content": [{"type": []}, {"type": "image_url", "image_url": {"url": "x"}}]}]})
    assert response.status_code == 200, response.text[:300]
    assert response.json()["usage"]["visual_tokens_original"] == 0
