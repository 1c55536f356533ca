"""Chunked prefill and encoder micro-batching on a real vLLM engine.

A tiny token budget per step splits every image's placeholders over several steps; the encoder
micro-batch of 1 makes a two-image request run the vision tower twice. Output must equal the same
Hugging Face reference that the unchunked engine (test_engine_llava.py) is held to.
"""

from __future__ import annotations

import pytest

from tests.conftest import make_image
from tests.hf_reference import HFLlava

pytestmark = pytest.mark.engine

PROMPT = "USER: <image>\n<image>\nCompare the two pictures.\nASSISTANT:"
STEPS = 6
MAX_TOKENS_PER_STEP = 32


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    engine = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        enable_chunked_prefill=True,
        max_num_batched_tokens=MAX_TOKENS_PER_STEP,
        max_num_seqs=2,
        hf_overrides={"idselect_encoder_micro_batch": 1},
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(tiny_model_dir) -> HFLlava:
    return HFLlava(tiny_model_dir)


@pytest.mark.parametrize("budget", [16, 64, None])
def test_chunked_prefill_matches_reference(llm, hf, budget):
    from vllm import SamplingParams

    images = [make_image(30), make_image(31)]
    request = {"prompt": PROMPT, "multi_modal_data": {"image": images}}
    if budget is not None:
        request["mm_processor_kwargs"] = {"visual_token_budget": budget}
    (out,) = llm.generate(request, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))

    kept = 576 if budget is None else budget
    assert out.prompt_token_ids.count(hf.image_token_id) == 2 * kept
    assert len(out.prompt_token_ids) > MAX_TOKENS_PER_STEP  # prefill really spans several steps
    expected = hf.greedy(out.prompt_token_ids, [hf.image_embeds(i, budget) for i in images], STEPS)
    assert list(out.outputs[0].token_ids) == expected
