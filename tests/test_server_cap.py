"""`--max-visual-token-budget N` through `idselect serve`, on all five backbones.

One real server per backbone, started with a maximum below its images' token counts: a request
without a budget keeps min(default, N) tokens per image; one at or under N keeps what it asks; one
above N gets a 400 naming the parameter and N, and the server keeps serving; usage and /metrics
report the capped counts; and vLLM's own start-up figures follow N (its reservation per image and
the images it profiles with, from the server log). The start-up errors are in
tests/test_options_contract.py; the profile of every backbone with and without N, from vLLM's own
budget computation, in tests/test_capacity.py.
"""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from devtools.tiny_internvl import write_tiny_internvl
from devtools.tiny_llava_next import write_tiny_llava_next
from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl
from idselect.tiny_checkpoint import write_tiny_llava
from tests.conftest import make_image
from tests.server_harness import image_message, metric_value, tiny_server

pytestmark = pytest.mark.engine

CAP = 40
# Videos are not pruned (their reservation stays vLLM's): these servers take images only, so
# that vLLM's profile is the images'.
IMAGES_ONLY = ["--limit-mm-per-prompt", '{"image": 8, "video": 0}']
# model -> (writer, extra server args, an image whose full count is above CAP)
MODELS = {
    "llava": (write_tiny_llava, [], (336, 336)),
    "llava-next": (write_tiny_llava_next, ["--max-model-len", "8192"], (448, 308)),
    "qwen2.5-vl": (write_tiny_qwen2_5_vl, ["--enforce-eager", *IMAGES_ONLY], (448, 308)),
    "qwen3-vl": (write_tiny_qwen3_vl, ["--enforce-eager", *IMAGES_ONLY], (448, 308)),
    "internvl": (write_tiny_internvl, ["--enforce-eager", "--max-model-len", "4096",
                                       *IMAGES_ONLY], (900, 500)),
}
PROFILE = re.compile(r"Encoder cache will be initialized with a budget of (\d+) tokens, and "
                     r"profiled with (\d+) image items")


@pytest.fixture(scope="module", params=list(MODELS))
def capped(request, tmp_path_factory):
    write, extra, size = MODELS[request.param]
    model_dir = write(tmp_path_factory.mktemp("models") / request.param)
    with tiny_server(model_dir, tmp_path_factory.mktemp("logs"), *extra,
                     "--max-visual-token-budget", str(CAP)) as server:
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)
        yield server, client, client.models.list().data[0].id, size, "--enforce-eager" in extra


def _chat(client, model_id, image, budget=None):
    extra = {} if budget is None else {"visual_token_budget": budget}
    return client.chat.completions.create(model=model_id, messages=image_message("What?", image),
                                          max_tokens=2, temperature=0, extra_body=extra)


def test_no_image_keeps_more_than_the_maximum(capped):
    server, client, model_id, size, _ = capped
    image = make_image(61, size)
    full = _chat(client, model_id, image, CAP - 1).usage.visual_tokens_original
    assert full > CAP
    before = httpx.get(server.base_url + "/metrics", timeout=10).text
    unbudgeted = _chat(client, model_id, image).usage
    assert (unbudgeted.visual_tokens_original, unbudgeted.visual_tokens_kept) == (full, CAP)
    assert _chat(client, model_id, image, 16).usage.visual_tokens_kept == 16
    assert _chat(client, model_id, image, CAP).usage.visual_tokens_kept == CAP
    after = httpx.get(server.base_url + "/metrics", timeout=10).text

    def delta(name: str) -> float:
        return sum(metric_value(after, name, {"budget": b}) - metric_value(before, name,
                                                                            {"budget": b})
                   for b in ("full", "<=16", "<=64", "<=192", ">192"))

    assert delta("idselect_visual_tokens_kept_total") == CAP + 16 + CAP
    assert delta("idselect_visual_tokens_original_total") == 3 * full
    # the unbudgeted request is counted under the budget it was served with
    assert metric_value(after, "idselect_images_total", {"budget": "<=64"}) - metric_value(
        before, "idselect_images_total", {"budget": "<=64"}) == 2


def test_a_budget_above_the_maximum_is_a_400_naming_it(capped):
    _, client, model_id, size, _ = capped
    for budget in (CAP + 1, 10**6):
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, model_id, make_image(62, size), budget)
        assert info.value.body["param"] == "visual_token_budget"
        assert str(CAP) in info.value.body["message"]
        assert "--max-visual-token-budget" in info.value.body["message"]
    assert _chat(client, model_id, make_image(62, size)).usage.visual_tokens_kept == CAP


def test_vllms_start_up_profile_follows_the_maximum(capped):
    """vLLM's own log: its reservation per image is CAP tokens, so its encoder budget holds
    budget // CAP images when it profiles (without a maximum: the model's largest image).
    vLLM's CPU runner profiles only when it compiles the model: with --enforce-eager (the
    Qwen-VL and InternVL servers here) it logs no profile; vLLM's own computation of those
    figures is checked for every backbone in tests/test_capacity.py."""
    server, *_, eager = capped
    profile = PROFILE.search(server.log())
    if eager:
        assert profile is None
        return
    budget, items = (int(v) for v in profile.groups())
    assert items == budget // CAP and items > 1
