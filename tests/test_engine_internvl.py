"""The InternVL plugin on a real vLLM engine (vLLM's interns1 model) with the tiny seeded model.

Against transformers' InternVL on the same weights (tests/hf_reference_internvl.py): prompt ids
(`<img>` + min(K, tiles x 256) `<IMG_CONTEXT>` + `</img>` per image), the embeddings handed to
the LLM (the projector on ID-Selection's picks across tiles and thumbnail, [CLS] scores grouped
by the pixel shuffle and normalised per tile), greedy tokens, chunked prefill across an image
boundary, two images of different sizes, K >= full = unpruned, the prompt-aware sources.
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools.tiny_internvl import TOKENS_PER_TILE, write_tiny_internvl
from idselect.vllm_plugin.selfcheck import verify_offline
from tests import engine_probe
from tests.conftest import make_image, refused
from tests.hf_reference_internvl import HFInternVL

pytestmark = pytest.mark.engine

STEPS = 5
MAX_TOKENS_PER_STEP = 96
# (width, height) -> tiles: one 448 tile; a 2x1 grid + thumbnail; a 1x3 grid + thumbnail.
SQUARE, WIDE, TALL = (448, 448), (900, 500), (300, 800)
TILES = {SQUARE: 1, WIDE: 3, TALL: 4}
QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_internvl(tmp_path_factory.mktemp("models") / "tiny-internvl")


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # test-only: the worker probe
    engine = LLM(model=str(model_dir), dtype="float32", max_model_len=4096, seed=0,
                 limit_mm_per_prompt={"image": 2}, enable_chunked_prefill=True,
                 max_num_batched_tokens=MAX_TOKENS_PER_STEP, enforce_eager=True)
    engine.apply_model(engine_probe.install)
    yield engine
    del engine


@pytest.fixture(scope="module")
def ref(model_dir) -> HFInternVL:
    return HFInternVL(model_dir)


def _prompt(ref: HFInternVL, images: int, question: str = QUESTION) -> str:
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return ref.processor.apply_chat_template([{"role": "user", "content": content}],
                                             add_generation_prompt=True)


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


def _pruned_ids(ref: HFInternVL, prompt: str, images, budget) -> list[int]:
    """The reference prompt with each image's `<IMG_CONTEXT>` run cut to min(K, full)."""
    ids = ref.prompt_ids(prompt, images)
    out, i = [], 0
    while i < len(ids):
        if ids[i] != ref.image_token_id:
            out.append(ids[i])
            i += 1
            continue
        run = i
        while i < len(ids) and ids[i] == ref.image_token_id:
            i += 1
        n = i - run
        out.extend([ref.image_token_id] * (n if budget is None else min(budget, n)))
    return out


def test_worker_runs_plugin_model(llm):
    verify_offline(llm)
    inspection = llm.collective_rpc("get_model_inspection")[0]
    assert inspection.startswith("IDSelectInternVLForConditionalGeneration(")


@pytest.mark.parametrize("size", list(TILES))
@pytest.mark.parametrize("budget", [16, 300, 10**6, None])
def test_embeddings_prompt_and_greedy_tokens_match_transformers(llm, ref, size, budget):
    image = make_image(60 + list(TILES).index(size), size)
    prompt = _prompt(ref, 1)
    llm.apply_model(engine_probe.drain)
    out = _generate(llm, prompt, [image], budget)
    full = TILES[size] * TOKENS_PER_TILE
    kept = full if budget is None else min(budget, full)
    assert list(out.prompt_token_ids) == _pruned_ids(ref, prompt, [image], budget)
    assert out.prompt_token_ids.count(ref.image_token_id) == kept
    expected = ref.image_embeds(image, budget)
    assert expected.shape[0] == kept
    ((_, projected),) = llm.apply_model(engine_probe.drain)[0]  # one projector call
    torch.testing.assert_close(torch.tensor(projected).reshape(-1, expected.shape[1]), expected,
                               rtol=1e-4, atol=1e-4)
    assert list(out.outputs[0].token_ids) == ref.greedy(out.prompt_token_ids, [expected], STEPS)


def test_selection_is_not_the_first_k_and_spans_tiles(ref):
    features, scores, tile_of_token = ref.vision(make_image(61, WIDE))
    from idselect.selection import id_select

    picks = id_select(features, scores, 24)
    assert not torch.equal(picks, torch.arange(24))
    assert len(set(tile_of_token[picks].tolist())) > 1, "all picks from one tile"


def test_two_images_of_different_sizes_chunked_across_the_boundary(llm, ref):
    images = [make_image(70, WIDE), make_image(71, SQUARE)]
    prompt = _prompt(ref, 2)
    ids = ref.prompt_ids(prompt, images)
    budget = MAX_TOKENS_PER_STEP - ids.index(ref.image_token_id) + 20  # chunk 1 ends in image 1
    out = _generate(llm, prompt, images, budget)
    assert list(out.prompt_token_ids) == _pruned_ids(ref, prompt, images, budget)
    assert len(out.prompt_token_ids) > MAX_TOKENS_PER_STEP  # more than one prefill step
    expected = [ref.image_embeds(i, budget) for i in images]
    assert list(out.outputs[0].token_ids) == ref.greedy(out.prompt_token_ids, expected, STEPS)


@pytest.mark.parametrize("importance", ["text", "unified"])
def test_prompt_aware_importance_matches_reference_and_is_keyed_by_prompt(llm, ref, importance):
    image = make_image(73, WIDE)
    seen = []
    for question in (QUESTION, "How many dogs are there?"):
        prompt = _prompt(ref, 1, question)
        out = _generate(llm, prompt, [image], 24, importance)
        expected = ref.image_embeds(image, 24, importance, ref.text_ids(out.prompt_token_ids))
        assert list(out.outputs[0].token_ids) == ref.greedy(out.prompt_token_ids, [expected],
                                                            STEPS)
        seen.append(expected)
    assert not torch.allclose(seen[0], seen[1]), "the prompt should change the selection"
    assert not torch.allclose(seen[0], ref.image_embeds(image, 24)), "should differ from visual"


@pytest.mark.parametrize("name", ["visual", "cls"])
def test_visual_importance_by_either_name_is_the_cls_score(llm, ref, name):
    image = make_image(74, TALL)
    llm.apply_model(engine_probe.drain)
    out = _generate(llm, _prompt(ref, 1), [image], 20, name)
    expected = ref.image_embeds(image, 20)
    assert list(out.outputs[0].token_ids) == ref.greedy(out.prompt_token_ids, [expected], STEPS)


def test_bad_budget_rejected_and_engine_keeps_serving(llm, ref):
    with refused("visual_token_budget"):
        _generate(llm, _prompt(ref, 1), [make_image(72, WIDE)], 0)
    out = _generate(llm, _prompt(ref, 1), [make_image(72, WIDE)], 8)
    assert out.prompt_token_ids.count(ref.image_token_id) == 8
