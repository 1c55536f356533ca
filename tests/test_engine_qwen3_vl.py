"""The Qwen3-VL plugin on a real vLLM engine with the tiny seeded model (DeepStack, M-RoPE).

Against transformers' Qwen3-VL on the same weights (tests/hf_reference_qwen3_vl.py): prompt
sizes, the rows handed to the LLM (main embedding and every DeepStack level) equal to the
reference's rows of the tokens ID-Selection picks, their (t, h, w) positions, greedy tokens,
chunked prefill across an image boundary, two images of different sizes, K >= full = unpruned,
the prompt-aware sources. The worker probe and request helpers are the Qwen2.5-VL tests'.
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl
from idselect.selection import id_select
from idselect.vllm_plugin.mrope import decode_positions, media_positions
from idselect.vllm_plugin.selfcheck import verify_offline
from tests.conftest import make_image, refused
from tests.hf_reference_qwen3_vl import HFQwen3VL
from tests.test_engine_qwen2_5_vl import (
    PROMPT,
    STEPS,
    TWO_IMAGES,
    _drain,
    _greedy,
    _request,
    install_probe,
)

pytestmark = pytest.mark.engine

MAX_TOKENS_PER_STEP = 64
# (width, height): 12 x 12, 14 x 7 (wide) and 7 x 13 (tall) post-merger tokens of 32 x 32 px.
SQUARE, WIDE, TALL = (384, 384), (448, 224), (224, 416)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_qwen3_vl(tmp_path_factory.mktemp("models") / "tiny-qwen3-vl")


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # test-only: the worker probe
    engine = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        enable_chunked_prefill=True,
        max_num_batched_tokens=MAX_TOKENS_PER_STEP,
        max_num_seqs=4,
        enforce_eager=True,
    )
    engine.apply_model(install_probe)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(model_dir) -> HFQwen3VL:
    return HFQwen3VL(model_dir)


def _full(hf: HFQwen3VL, image) -> int:
    return hf.vision(image).features.shape[0]


def test_worker_runs_plugin_model(llm):
    verify_offline(llm)
    inspection = llm.collective_rpc("get_model_inspection")[0]
    assert inspection.startswith("IDSelectQwen3VLForConditionalGeneration(")


@pytest.mark.parametrize("size", [SQUARE, WIDE, TALL])
@pytest.mark.parametrize("budget", [1, 16, 100, 10**9, None])
def test_prompt_tokens_are_text_plus_min_k_full(llm, hf, size, budget):
    image = make_image(1, size)
    (out,) = llm.generate(_request(PROMPT, [image], budget), _greedy(1))
    full = _full(hf, image)
    kept = full if budget is None else min(budget, full)
    assert out.prompt_token_ids.count(hf.image_token_id) == kept
    text = len(hf.processor.tokenizer(PROMPT).input_ids) - 1
    assert len(out.prompt_token_ids) == text + kept


def test_kept_rows_are_the_tokens_own_main_and_deepstack_rows(llm, hf):
    """Selection on the main merger output; every DeepStack level cut with the same indices,
    positions the kept tokens' own; and all of it is what transformers computes."""
    images, budget = [make_image(2, TALL), make_image(3, WIDE)], 8
    _drain(llm)
    (out,) = llm.generate(_request(TWO_IMAGES, images, budget), _greedy(1))
    probe = _drain(llm)
    (call,) = probe["select"]
    (embeds,) = [e for e in probe["embeds"] if e]
    units, scores, keeps, picks = call
    assert keeps == [budget, budget]
    width = hf.dim * (1 + hf.levels)
    for i, image in enumerate(images):
        ref = hf.vision(image)
        u, s, p = torch.tensor(units[i]), torch.tensor(scores[i]), torch.tensor(picks[i])
        assert torch.equal(p, id_select(u, s, budget))
        assert not torch.equal(p, torch.arange(budget)), "selection degenerated to the first K"
        scale = float(ref.features.abs().max())
        torch.testing.assert_close(u, hf.units(ref), rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(s, ref.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(p, hf.picks(image, budget))
        rows = torch.tensor(embeds[i])
        assert rows.shape[1] == width + 8  # + the position channels
        torch.testing.assert_close(rows[:, :width], ref.features[p], rtol=1e-4,
                                   atol=1e-5 * scale)
        _, h, w = ref.grid_thw.tolist()
        assert torch.equal(decode_positions(rows[:, width:]), media_positions(1, h // 2, w // 2)[p])


def _check_against_reference(llm, hf, prompt, images, budgets, budget_kwarg, importance=None):
    _drain(llm)
    (out,) = llm.generate(_request(prompt, images, budget_kwarg, importance), _greedy())
    ids, positions, embeds = hf.pruned_prompt(prompt, images, budgets, importance or "visual")
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == hf.greedy(ids, positions, embeds, STEPS)
    steps = [torch.tensor(p) for p in _drain(llm)["positions"]]
    decode = positions.max() + 1 + torch.arange(STEPS - 1)
    expected = torch.cat([positions, decode.expand(3, -1)], dim=1)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected)
    return len(steps) - (STEPS - 1)


@pytest.mark.parametrize("size", [TALL, WIDE])
@pytest.mark.parametrize("budget", [16, 10**9, None])
def test_tokens_and_positions_equal_transformers_with_same_selection(llm, hf, size, budget):
    _check_against_reference(llm, hf, PROMPT, [make_image(5, size)], [budget], budget)


def test_two_images_of_different_sizes_chunked_across_the_boundary(llm, hf):
    images = [make_image(6, SQUARE), make_image(7, TALL)]
    assert _full(hf, images[0]) != _full(hf, images[1])
    first = hf.processor.tokenizer(TWO_IMAGES).input_ids.index(hf.image_token_id)
    budget = MAX_TOKENS_PER_STEP - first + 10  # the first chunk ends inside the first image
    assert _check_against_reference(llm, hf, TWO_IMAGES, images, [budget] * 2, budget) >= 2


@pytest.mark.parametrize("importance", ["text", "unified"])
def test_prompt_aware_importance_matches_reference(llm, hf, importance):
    image = make_image(19, WIDE)
    _check_against_reference(llm, hf, PROMPT, [image], [16], 16, importance)
    # ... and that selection is not the visual one (the tokens and positions above would not
    # tell a prompt-aware selection from a visual one that happened to agree).
    ids = hf.processor(text=[PROMPT], images=[image]).input_ids[0]
    assert hf.picks(image, 16, importance, hf.text_ids(ids)).tolist() != (
        hf.picks(image, 16).tolist()), f"{importance} should differ from visual"


def test_cls_and_videos_are_refused_and_the_engine_keeps_serving(llm, hf):
    image = make_image(18, WIDE)
    with refused("visual_token_importance", match=r"\[CLS\]"):
        llm.generate(_request(PROMPT, [image], 16, "cls"), _greedy(1))
    video = [make_image(20 + i, (128, 128)) for i in range(4)]
    video_prompt = PROMPT.replace("<|image_pad|>", "<|video_pad|>")
    with pytest.raises(ValueError, match="video"):
        llm.generate({"prompt": video_prompt, "multi_modal_data": {"video": video}}, _greedy(1))
    (out,) = llm.generate(_request(PROMPT, [image], 16), _greedy(1))
    assert out.prompt_token_ids.count(hf.image_token_id) == 16
