"""`idselect serve` on the other supported architectures: LLaVA-NeXT and Qwen2.5-VL.

One real server per model, driven with the official `openai` client: the prompt shrinks to
text + K visual tokens per image, no budget serves the image unpruned, bad budgets are 400s.
"""

from __future__ import annotations

import openai
import pytest
from transformers import AutoTokenizer

from devtools.tiny_llava_next import write_tiny_llava_next
from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from tests.conftest import make_image
from tests.server_harness import image_message, tiny_server

pytestmark = pytest.mark.engine

MODELS = {
    "llava-next": (write_tiny_llava_next, "<image>", ["--max-model-len", "8192"]),
    "qwen2.5-vl": (write_tiny_qwen2_5_vl, "<|image_pad|>", ["--enforce-eager"]),
}
QUESTION = "What is in the image?"


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    write, image_token, extra = MODELS[request.param]
    model_dir = write(tmp_path_factory.mktemp("models") / request.param)
    with tiny_server(model_dir, tmp_path_factory.mktemp("logs"), *extra) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        yield client, client.models.list().data[0].id, tokenizer, image_token


def _text_tokens(tokenizer, image_token: str) -> int:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": QUESTION}]}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    assert ids.count(image_id) == 1
    return len(ids) - 1


def _chat(client, model_id, budget):
    return client.chat.completions.create(
        model=model_id, messages=image_message(QUESTION, make_image(90, (448, 308))),
        max_tokens=3, temperature=0,
        extra_body={} if budget is None else {"visual_token_budget": budget},
    )


def test_budget_shrinks_the_prompt_to_text_plus_k(served):
    client, model_id, tokenizer, image_token = served
    text = _text_tokens(tokenizer, image_token)
    full = _chat(client, model_id, None).usage.prompt_tokens - text
    assert full > 64
    for budget in (16, 64):
        assert _chat(client, model_id, budget).usage.prompt_tokens == text + budget
    assert _chat(client, model_id, 10**6).usage.prompt_tokens == text + full


def test_bad_budget_is_400(served):
    client, model_id, _, _ = served
    with pytest.raises(openai.BadRequestError) as info:
        _chat(client, model_id, 0)
    assert info.value.body["param"] == "visual_token_budget"
    assert _chat(client, model_id, 16).usage.prompt_tokens > 16
