"""`idselect serve` on LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL and InternVL (LLaVA-1.5: test_server.py).

One real server per model, driven with the official `openai` client. Exact visual usage: every
response's `usage.visual_tokens_original` / `visual_tokens_kept` (also in the final streamed
chunk) is what the engine's processing decided for that request's images, checked against counts
from the model's own Hugging Face processor on the same images (independent of vLLM), for two
image sizes, two images of different sizes in one request, budgets below, between and above the
images' counts; the `/metrics` counters rise by exactly the responses' sums. Prompt-aware
importance (`text`, `unified`) is accepted on each; bad budgets and sources are 400s.
"""

from __future__ import annotations

import httpx
import openai
import pytest
from transformers import AutoProcessor

from devtools.tiny_internvl import write_tiny_internvl
from devtools.tiny_llava_next import write_tiny_llava_next
from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl
from tests.conftest import make_image
from tests.server_harness import image_message, metric_value, tiny_server

pytestmark = pytest.mark.engine

# model -> (test-model writer, image placeholder token, extra server args, prompt tokens around
# each image's placeholders, a size with a different count than SMALL)
MODELS = {
    "llava-next": (write_tiny_llava_next, "<image>", ["--max-model-len", "8192"], 0, (448, 308)),
    "qwen2.5-vl": (write_tiny_qwen2_5_vl, "<|image_pad|>", ["--enforce-eager"], 0, (448, 308)),
    "qwen3-vl": (write_tiny_qwen3_vl, "<|image_pad|>", ["--enforce-eager"], 0, (448, 308)),
    # <img> ... </img> around the context tokens; 900 x 500 is 2 tiles + a thumbnail
    "internvl": (write_tiny_internvl, "<IMG_CONTEXT>", ["--enforce-eager", "--max-model-len",
                                                        "4096"], 2, (900, 500)),
}
# LLaVA-NeXT 1x1 tile + base vs 1x2 tiles; Qwen2.5-VL 8 x 8 vs 16 x 11 post-merger tokens;
# Qwen3-VL 7 x 7 vs 14 x 10; InternVL 1 tile vs 3 tiles.
SMALL = (224, 224)
QUESTION = "What is in the image?"


@pytest.fixture(scope="module", params=list(MODELS))
def served(request, tmp_path_factory):
    write, image_token, extra, around, large = MODELS[request.param]
    model_dir = write(tmp_path_factory.mktemp("models") / request.param)
    with tiny_server(model_dir, tmp_path_factory.mktemp("logs"), *extra) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        processor = AutoProcessor.from_pretrained(model_dir)
        yield Served(request.param, server, client, client.models.list().data[0].id, processor,
                     image_token, around, large)


class Served:
    def __init__(self, name, server, client, model_id, processor, image_token, around, large):
        self.name, self.server, self.client, self.model_id = name, server, client, model_id
        self.processor, self.image_token, self.around, self.large = (
            processor, image_token, around, large)

    def full_tokens(self, image) -> int:
        """Tokens the model's own HF processor expands one image into (no vLLM involved)."""
        tokenizer = self.processor.tokenizer
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": QUESTION}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = self.processor(text=[prompt], images=[image]).input_ids[0]
        return list(ids).count(tokenizer.convert_tokens_to_ids(self.image_token))

    def text_tokens(self, images: int) -> int:
        parts = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
        ids = self.processor.tokenizer.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True,
            return_dict=False,
        )
        # one placeholder per image as written; served with `around` structure tokens each
        return len(ids) - images + self.around * images

    def chat(self, images, budget=None, importance=None, **kwargs):
        extra = {k: v for k, v in (("visual_token_budget", budget),
                                   ("visual_token_importance", importance)) if v is not None}
        return self.client.chat.completions.create(
            model=self.model_id, messages=image_message(QUESTION, *images), max_tokens=3,
            temperature=0, extra_body=extra, **kwargs,
        )

    def metrics(self) -> str:
        return httpx.get(self.server.base_url + "/metrics", timeout=10).text


def _usage(usage) -> tuple[int, int]:
    return usage.visual_tokens_original, usage.visual_tokens_kept


def _kept(budget, full: int) -> int:
    # Every model here keeps min(K, full): LLaVA-NeXT drops its newline tokens only when
    # pruning, and these budgets are far below any image's non-newline count or above its full.
    return full if budget is None or budget >= full else budget


@pytest.mark.parametrize("large", [False, True])
@pytest.mark.parametrize("budget", [None, 16, 10**6])
def test_usage_is_exact_for_one_image(served, large, budget):
    image = make_image(90 + large, served.large if large else SMALL)
    full = served.full_tokens(image)
    response = served.chat([image], budget)
    kept = _kept(budget, full)
    assert _usage(response.usage) == (full, kept)
    assert response.usage.prompt_tokens == served.text_tokens(1) + kept


def test_usage_sums_two_images_of_different_sizes_streamed_and_not(served):
    images = [make_image(92, SMALL), make_image(93, served.large)]
    fulls = [served.full_tokens(i) for i in images]
    assert fulls[0] != fulls[1]
    budget = 24
    expected = (sum(fulls), sum(_kept(budget, f) for f in fulls))
    plain = served.chat(images, budget)
    assert _usage(plain.usage) == expected
    assert plain.usage.prompt_tokens == served.text_tokens(2) + expected[1]
    stream = list(served.chat(images, budget, stream=True,
                              stream_options={"include_usage": True}))
    (last,) = [c for c in stream if c.usage is not None]
    assert last is stream[-1] and _usage(last.usage) == expected


def test_a_budget_between_two_images_counts_prunes_only_the_larger(served):
    images = [make_image(94, SMALL), make_image(95, served.large)]
    small, large = (served.full_tokens(i) for i in images)
    # Keeps all of the small image (LLaVA-NeXT: newlines included) and prunes the large one to
    # exactly K (below its count without newlines too: 1,178 of 1,416 here).
    budget = small + 1
    response = served.chat(images, budget)
    assert _usage(response.usage) == (small + large, small + budget)


def test_metrics_counters_rise_by_exactly_what_the_responses_report(served):
    before = served.metrics()
    reported = [0, 0]
    for images, budget in (([make_image(96, SMALL)], 16), ([make_image(97, served.large)], None),
                           ([make_image(96, SMALL), make_image(97, served.large)], 8)):
        original, kept = _usage(served.chat(images, budget).usage)
        reported[0] += original
        reported[1] += kept
    stream = served.chat([make_image(98, served.large)], 12, stream=True)  # usage not asked for
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) is not None
    reported[0] += served.full_tokens(make_image(98, served.large))
    reported[1] += 12
    after = served.metrics()

    def delta(name):
        return sum(metric_value(after, name, {"budget": b}) - metric_value(before, name,
                                                                            {"budget": b})
                   for b in ("full", "<=16", "<=64", "<=192", ">192"))

    assert delta("idselect_images_total") == 5
    assert delta("idselect_visual_tokens_original_total") == reported[0]
    assert delta("idselect_visual_tokens_kept_total") == reported[1]


@pytest.mark.parametrize("importance", ["visual", "text", "unified"])
def test_importance_sources_are_served(served, importance):
    image = make_image(99, served.large)
    response = served.chat([image], 16, importance)
    assert _usage(response.usage) == (served.full_tokens(image), 16)
    assert response.choices[0].message.content is not None


def test_cls_is_a_visual_alias_only_where_the_tower_has_one(served):
    image = make_image(99, SMALL)
    if served.name in ("llava-next", "internvl"):  # towers with a [CLS] token
        assert served.chat([image], 16, "cls").usage.visual_tokens_kept == 16
        return
    with pytest.raises(openai.BadRequestError) as info:
        served.chat([image], 16, "cls")
    assert info.value.body["param"] == "visual_token_importance"
    assert "[CLS]" in info.value.body["message"]
    assert served.chat([image], 16).usage.visual_tokens_kept == 16


def test_bad_budget_is_400(served):
    with pytest.raises(openai.BadRequestError) as info:
        served.chat([make_image(90, SMALL)], 0)
    assert info.value.body["param"] == "visual_token_budget"
    assert served.chat([make_image(90, SMALL)], 16).usage.visual_tokens_kept == 16


@pytest.mark.parametrize("selector", ["topk", "divprune", "random", "pool"])
def test_every_selector_keeps_exactly_k(served, selector):
    image = make_image(89, served.large)
    response = served.client.chat.completions.create(
        model=served.model_id, messages=image_message(QUESTION, image), max_tokens=2,
        extra_body={"visual_token_budget": 12, "visual_token_selector": selector},
    )
    assert _usage(response.usage) == (served.full_tokens(image), 12)
    assert response.usage.prompt_tokens == served.text_tokens(1) + 12
