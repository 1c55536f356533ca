"""The OpenAI-compatible server, as a real subprocess, driven by the official `openai` client.

Two servers for the module: one with an API key and no default budget, one with a default
budget and no key. Expected prompt sizes come from the model's own tokenizer and chat template.
"""

from __future__ import annotations

import os

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import make_image
from tests.server_harness import image_message, metric_value, tiny_server

pytestmark = pytest.mark.engine

FULL = 576
KEY = "test-key-0123"
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), "--api-key", KEY) as s:
        yield s


@pytest.fixture(scope="module")
def defaulted(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    with tiny_server(tiny_model_dir, logs, "--visual-token-budget", "32",
                     "--visual-token-importance", "unified", "--visual-token-selector", "topk",
                     "--selection-backend", "torch") as s:
        yield s


@pytest.fixture(scope="module")
def client(keyed) -> openai.OpenAI:
    return openai.OpenAI(base_url=keyed.base_url + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def text_tokens(tiny_model_dir):
    """Prompt tokens of a chat request other than image placeholders, from the chat template."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    def count(text: str, images: int) -> int:
        parts = [{"type": "image"}] * images + [{"type": "text", "text": text}]
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        assert ids.count(image_id) == images
        return len(ids) - images

    return count


def _chat(client, model_id, images, budget=..., **kwargs):
    extra = {} if budget is ... else {"visual_token_budget": budget}
    return client.chat.completions.create(
        model=model_id, messages=image_message(QUESTION, *images), max_tokens=4,
        temperature=0, extra_body=extra, **kwargs,
    )


@pytest.mark.parametrize("budget, kept", [(..., FULL), (None, FULL), (16, 16), (64, 64),
                                          (FULL, FULL), (10**9, FULL)])
def test_chat_prompt_tokens_and_visual_usage(client, model_id, text_tokens, budget, kept):
    response = _chat(client, model_id, [make_image(1)], budget)
    usage = response.usage
    assert usage.prompt_tokens == text_tokens(QUESTION, 1) + kept
    assert usage.visual_tokens_original == FULL
    assert usage.visual_tokens_kept == kept
    assert response.choices[0].message.content is not None


def test_streaming_reports_visual_usage_in_final_chunk(client, model_id, text_tokens):
    stream = _chat(client, model_id, [make_image(2)], 16, stream=True,
                   stream_options={"include_usage": True})
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
    usage = usage_chunks[0].usage
    assert usage.prompt_tokens == text_tokens(QUESTION, 1) + 16
    assert (usage.visual_tokens_original, usage.visual_tokens_kept) == (FULL, 16)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_budget_inside_mm_processor_kwargs(client, model_id, text_tokens):
    response = client.chat.completions.create(
        model=model_id, messages=image_message(QUESTION, make_image(3)), max_tokens=2,
        extra_body={"mm_processor_kwargs": {"visual_token_budget": 48}},
    )
    assert response.usage.prompt_tokens == text_tokens(QUESTION, 1) + 48
    assert response.usage.visual_tokens_kept == 48


def test_two_images(client, model_id, text_tokens):
    response = _chat(client, model_id, [make_image(4), make_image(5)], 16)
    assert response.usage.prompt_tokens == text_tokens(QUESTION, 2) + 2 * 16
    assert (response.usage.visual_tokens_original, response.usage.visual_tokens_kept) == (
        2 * FULL, 2 * 16)


BAD = [0, -1, 1.5, "16", True, [16], {"k": 16}, 16.0]


@pytest.mark.parametrize("bad", BAD, ids=repr)
def test_bad_budget_is_400_naming_param_and_server_keeps_serving(client, model_id, bad):
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, model_id, [make_image(6)], bad)
    error = info.value.body
    assert error["param"] == "visual_token_budget"
    assert error["type"] == "invalid_request_error"
    assert "visual_token_budget" in error["message"]
    assert _chat(client, model_id, [make_image(6)], 16).usage.visual_tokens_kept == 16


def test_conflicting_and_foreign_mm_kwargs_are_400(client, model_id):
    def send(extra):
        return client.chat.completions.create(
            model=model_id, messages=image_message(QUESTION, make_image(6)), max_tokens=2,
            extra_body=extra,
        )

    with pytest.raises(openai.BadRequestError) as info:
        send({"visual_token_budget": 16, "mm_processor_kwargs": {"visual_token_budget": 32}})
    assert info.value.body["param"] == "visual_token_budget"
    with pytest.raises(openai.BadRequestError) as info:
        send({"mm_processor_kwargs": {"do_resize": False}})
    assert info.value.body["param"] == "mm_processor_kwargs"
    with pytest.raises(openai.BadRequestError) as info:
        send({"media_io_kwargs": {"image": {"mode": "L"}}})
    assert info.value.body["param"] == "media_io_kwargs"
    assert send({"visual_token_budget": 16,
                 "mm_processor_kwargs": {"visual_token_budget": 16}}).usage.visual_tokens_kept == 16


def test_metrics_rise_by_exactly_the_expected_amounts(keyed, client, model_id):
    def scrape() -> str:
        return httpx.get(keyed.base_url + "/metrics", timeout=10).text

    def sample(text, name, **labels):
        return metric_value(text, name, labels)

    before = scrape()
    _chat(client, model_id, [make_image(40), make_image(41)], 16)  # 2 images, <=16
    _chat(client, model_id, [make_image(42)], 100)  # <=192
    _chat(client, model_id, [make_image(43)])  # full
    with pytest.raises(openai.BadRequestError):
        _chat(client, model_id, [make_image(43)], 0)
    after = scrape()

    def delta(name, **labels):
        return sample(after, name, **labels) - sample(before, name, **labels)

    assert delta("idselect_images_total", budget="<=16") == 2
    assert delta("idselect_visual_tokens_original_total", budget="<=16") == 2 * FULL
    assert delta("idselect_visual_tokens_kept_total", budget="<=16") == 2 * 16
    assert delta("idselect_images_total", budget="<=192") == 1
    assert delta("idselect_visual_tokens_kept_total", budget="<=192") == 100
    assert delta("idselect_images_total", budget="full") == 1
    assert delta("idselect_visual_tokens_kept_total", budget="full") == FULL
    # measured in the worker process, pruned images only
    assert delta("idselect_selection_seconds_count", selector="id_select") == 3
    assert delta("idselect_requests_total", budget="<=16", code="2xx") == 1
    assert delta("idselect_requests_total", budget="full", code="2xx") == 1
    assert delta("idselect_requests_total", budget="invalid", code="4xx") == 1
    assert delta("idselect_request_duration_seconds_count", budget="<=192") == 1
    assert "vllm:num_requests_waiting" in after  # vLLM's own metrics on the same page


def test_capacity_model_matches_vllms_own_kv_figures(keyed, tiny_model_dir):
    """`idselect capacity`'s arithmetic on the engine this server started (1 GiB of KV cache,
    float32) against the KV cache size and maximum concurrency vLLM logged."""
    from tests.test_capacity import check_against_vllms_log

    check_against_vllms_log(keyed.log(), tiny_model_dir, kv_space_gib=1, dtype_bytes=4)


def test_api_key_required_on_v1_only(keyed):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        response = httpx.get(keyed.base_url + "/v1/models", headers=headers, timeout=10)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.get(keyed.base_url + "/v1/models", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200
    assert httpx.get(keyed.base_url + "/health", timeout=10).status_code == 200
    assert httpx.get(keyed.base_url + "/metrics", timeout=10).status_code == 200
    assert KEY not in keyed.log()


def test_server_default_budget_applies_and_requests_override_it(defaulted, text_tokens):
    client = openai.OpenAI(base_url=defaulted.base_url + "/v1", api_key="unused", max_retries=0)
    model_id = client.models.list().data[0].id
    default = _chat(client, model_id, [make_image(7)])
    assert default.usage.prompt_tokens == text_tokens(QUESTION, 1) + 32
    assert default.usage.visual_tokens_kept == 32
    assert _chat(client, model_id, [make_image(7)], None).usage.visual_tokens_kept == 32
    overridden = _chat(client, model_id, [make_image(7)], 10**9)
    assert overridden.usage.prompt_tokens == text_tokens(QUESTION, 1) + FULL
    assert "importance: unified" in defaulted.log()  # the worker got the deployment defaults
    assert "selector: topk" in defaulted.log()
    assert "selection backend torch on cpu" in defaulted.log()
    assert httpx.get(defaulted.base_url + "/health", timeout=10).status_code == 200


def test_importance_source_per_request(client, model_id, text_tokens):
    for source in ("cls", "text", "unified"):
        response = client.chat.completions.create(
            model=model_id, messages=image_message(QUESTION, make_image(8)), max_tokens=2,
            extra_body={"visual_token_budget": 16, "visual_token_importance": source},
        )
        assert response.usage.prompt_tokens == text_tokens(QUESTION, 1) + 16
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_id, messages=image_message(QUESTION, make_image(8)), max_tokens=2,
            extra_body={"visual_token_importance": "attention"},
        )
    assert info.value.body["param"] == "visual_token_importance"


def test_selection_backend_flag_reaches_the_workers_environment(monkeypatch):
    from idselect.selection import BACKEND_ENV
    from server.serve import _adopt_idselect_options, build_parser, parse_args

    # setenv (unlike delenv of an unset variable) records the original state, so the value
    # _adopt_idselect_options writes into os.environ is undone too: later servers must not see it.
    monkeypatch.setenv(BACKEND_ENV, "")
    assert build_parser().parse_args(["model"]).selection_backend == "auto"
    args = build_parser().parse_args(["model", "--selection-backend", "triton"])
    _adopt_idselect_options(args)  # spawned model workers inherit the server's environment
    assert os.environ[BACKEND_ENV] == "triton"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(SystemExit):
        parse_args(["model"])


def test_selector_per_request_keeps_k_and_is_counted_under_its_label(keyed, client, model_id,
                                                                    text_tokens):
    def scrape() -> str:
        return httpx.get(keyed.base_url + "/metrics", timeout=10).text

    before = scrape()
    for name in ("id_select", "topk", "divprune", "random", "pool"):
        response = client.chat.completions.create(
            model=model_id, messages=image_message(QUESTION, make_image(50)), max_tokens=2,
            extra_body={"visual_token_budget": 16, "visual_token_selector": name},
        )
        assert response.usage.prompt_tokens == text_tokens(QUESTION, 1) + 16
        assert response.usage.visual_tokens_kept == 16
    nested = client.chat.completions.create(
        model=model_id, messages=image_message(QUESTION, make_image(51)), max_tokens=2,
        extra_body={"mm_processor_kwargs": {"visual_token_budget": 8,
                                            "visual_token_selector": "pool"}},
    )
    assert nested.usage.visual_tokens_kept == 8
    after = scrape()
    for name, count in (("id_select", 1), ("topk", 1), ("divprune", 1), ("random", 1),
                        ("pool", 2)):
        labels = {"selector": name}
        assert metric_value(after, "idselect_selection_seconds_count", labels) - metric_value(
            before, "idselect_selection_seconds_count", labels) == count, name
    for bad in ("fastv", "", 3, ["topk"]):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=model_id, messages=image_message(QUESTION, make_image(52)), max_tokens=2,
                extra_body={"visual_token_budget": 16, "visual_token_selector": bad},
            )
        assert info.value.body["param"] == "visual_token_selector"
    assert "fastv" not in scrape()  # never a label value: client strings are not echoed
