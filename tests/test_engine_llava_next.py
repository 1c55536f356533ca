"""The LLaVA-NeXT (AnyRes) plugin on a real vLLM engine with the tiny seeded model.

Images of different sizes give different tile grids; expected counts and embeddings come from
Hugging Face transformers' LLaVA-NeXT on the same weights (its own AnyRes packing).
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools.tiny_llava_next import write_tiny_llava_next
from idselect.vllm_plugin.selfcheck import verify_offline
from tests import engine_probe
from tests.conftest import make_image, refused
from tests.hf_reference import HFLlavaNext

pytestmark = pytest.mark.engine

PROMPT = "USER: <image>\nWhat is in the image?\nASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nCompare them.\nASSISTANT:"
STEPS = 5
SIZES = [(336, 336), (600, 300), (500, 500)]  # (width, height): 1x1+base, 1x2, 2x2 tiles


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_llava_next(tmp_path_factory.mktemp("models") / "tiny-llava-next")


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # test-only: the worker probe
    engine = LLM(model=str(model_dir), dtype="float32", max_model_len=8192, seed=0,
                 limit_mm_per_prompt={"image": 2})
    engine.apply_model(engine_probe.install)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(model_dir) -> HFLlavaNext:
    return HFLlavaNext(model_dir)


def _generate(llm, prompt, images, budget=None, importance=None):
    from vllm import SamplingParams

    request = {"prompt": prompt,
               "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
    options = {"visual_token_budget": budget, "visual_token_importance": importance}
    if budget is not None or importance is not None:
        request["mm_processor_kwargs"] = {k: v for k, v in options.items() if v is not None}
    (out,) = llm.generate(request, SamplingParams(max_tokens=STEPS, temperature=0,
                                                  ignore_eos=True))
    return out


def _text_tokens(hf, prompt):
    ids = hf.processor.tokenizer(prompt).input_ids
    return len(ids) - ids.count(hf.image_token_id)


def test_worker_runs_plugin_model(llm):
    verify_offline(llm)


@pytest.mark.parametrize("size", SIZES)
def test_prompt_tokens_per_size_and_budget(llm, hf, size):
    image = make_image(50, size)
    full = hf.full_image_embeds(image).shape[0]
    without_newlines = hf.vision(image)[0].shape[0]
    text = _text_tokens(hf, PROMPT)
    for budget, kept in [(None, full), (16, 16), (200, 200), (full - 1, without_newlines),
                         (full, full), (10**6, full)]:
        out = _generate(llm, PROMPT, [image], budget)
        assert out.prompt_token_ids.count(hf.image_token_id) == kept, (size, budget)
        assert len(out.prompt_token_ids) == text + kept


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("budget", [16, 200, None])
def test_embeddings_and_greedy_output_match_transformers(llm, hf, size, budget):
    image = make_image(60 + SIZES.index(size), size)
    llm.apply_model(engine_probe.drain)
    out = _generate(llm, PROMPT, [image], budget)
    expected = hf.image_embeds(image, budget)
    if budget is not None:
        ((_, projected),) = llm.apply_model(engine_probe.drain)[0]
        torch.testing.assert_close(torch.tensor(projected), expected, rtol=1e-4, atol=1e-4)
    assert list(out.outputs[0].token_ids) == hf.greedy(out.prompt_token_ids, [expected], STEPS)


def test_two_images_of_different_sizes(llm, hf):
    images = [make_image(70, (600, 300)), make_image(71, (336, 336))]
    out = _generate(llm, TWO_IMAGES, images, 32)
    assert len(out.prompt_token_ids) == _text_tokens(hf, TWO_IMAGES) + 2 * 32
    expected = [hf.image_embeds(i, 32) for i in images]
    assert list(out.outputs[0].token_ids) == hf.greedy(out.prompt_token_ids, expected, STEPS)


def test_bad_budget_rejected(llm, hf):
    with refused("visual_token_budget"):
        _generate(llm, PROMPT, [make_image(72, (600, 300))], 0)
    assert len(_generate(llm, PROMPT, [make_image(72, (600, 300))], 8).prompt_token_ids) == (
        _text_tokens(hf, PROMPT) + 8)


@pytest.mark.parametrize("importance", ["text", "unified"])
def test_prompt_aware_importance_matches_reference_and_is_keyed_by_prompt(llm, hf, importance):
    """Across base view and tiles: each prompt gets its own selection (no stale cache hit)."""
    image = make_image(73, (600, 300))
    seen = []
    for prompt in [PROMPT, "USER: <image>\nHow many dogs are there?\nASSISTANT:"]:
        llm.apply_model(engine_probe.drain)
        out = _generate(llm, prompt, [image], 24, importance)
        (_, projected) = llm.apply_model(engine_probe.drain)[0][-1]
        text_ids = [t for t in out.prompt_token_ids if t != hf.image_token_id]
        expected = hf.image_embeds(image, 24, importance, text_ids)
        torch.testing.assert_close(torch.tensor(projected), expected, rtol=1e-4, atol=1e-4)
        assert list(out.outputs[0].token_ids) == hf.greedy(out.prompt_token_ids, [expected], STEPS)
        seen.append(expected)
    assert not torch.allclose(seen[0], seen[1]), "the prompt should change the selection"
    assert not torch.allclose(seen[0], hf.image_embeds(image, 24)), "should differ from visual"


@pytest.mark.parametrize("name", ["visual", "cls"])
def test_visual_importance_by_either_name_is_the_cls_score(llm, hf, name):
    image = make_image(74, (500, 500))
    llm.apply_model(engine_probe.drain)
    _generate(llm, PROMPT, [image], 20, name)
    (_, projected) = llm.apply_model(engine_probe.drain)[0][-1]
    torch.testing.assert_close(torch.tensor(projected), hf.image_embeds(image, 20),
                               rtol=1e-4, atol=1e-4)
