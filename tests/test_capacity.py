"""Capacity: vLLM's own reservations follow the maximum budget, and the capacity model agrees
with vLLM's own KV figures.

- vLLM's encoder budget computation (`MultiModalBudget`, what the engine's start-up log reports)
  on every backbone's tiny model, without and with `idselect_max_visual_token_budget`: the
  reservation per image drops to the maximum, and the images the encoder cache holds rise.
- `idselect capacity`'s arithmetic against vLLM's "KV cache size: N tokens" and "Maximum
  concurrency for L tokens per request" from a real engine's log (the tiny LLaVA), within 5%.
"""

from __future__ import annotations

import re

import pytest

from devtools.tiny_internvl import write_tiny_internvl
from devtools.tiny_llava_next import write_tiny_llava_next
from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl
from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl
from idselect.capacity import (
    GIB,
    PRESETS,
    kv_cache_tokens,
    load_model_memory,
    max_concurrency,
    model_memory,
)
from idselect.tiny_checkpoint import write_tiny_llava
from idselect.vllm_plugin.settings import MAX_BUDGET_KEY

CAP = 40
WRITERS = {
    "llava": write_tiny_llava, "llava-next": write_tiny_llava_next,
    "qwen2.5-vl": write_tiny_qwen2_5_vl, "qwen3-vl": write_tiny_qwen3_vl,
    "internvl": write_tiny_internvl,
}


def _budget(model_dir, cap: int | None, videos: int = 0):
    from vllm.config import ModelConfig, VllmConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.encoder_budget import MultiModalBudget
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    overrides = {} if cap is None else {MAX_BUDGET_KEY: cap}
    config = VllmConfig(model_config=ModelConfig(
        model=str(model_dir), hf_overrides=overrides,
        limit_mm_per_prompt={"image": 8, "video": videos},
        max_model_len=4096 if "llava" not in str(model_dir) else 2048))
    return MultiModalBudget(config, MULTIMODAL_REGISTRY)


@pytest.mark.parametrize("backbone", list(WRITERS))
def test_vllms_reservation_per_image_follows_the_maximum(backbone, tmp_path_factory):
    model_dir = WRITERS[backbone](tmp_path_factory.mktemp("models") / backbone)
    stock, capped = _budget(model_dir, None), _budget(model_dir, CAP)
    largest = stock.mm_max_toks_per_item["image"]
    assert largest > CAP
    assert capped.mm_max_toks_per_item["image"] == CAP
    scheduled = capped.scheduler_config.max_num_encoder_input_tokens
    assert stock.get_encoder_budget() == max(scheduled, largest)
    assert capped.get_encoder_budget() == max(scheduled, CAP)
    # The images the encoder cache is sized (and profiled) for, at the same token budget.
    assert (capped.mm_max_items_per_batch["image"]
            == capped.get_encoder_budget() // CAP > stock.mm_max_items_per_batch["image"])
    if backbone in ("qwen2.5-vl", "internvl"):  # videos are not pruned: their reservation stays
        with_videos = _budget(model_dir, CAP, videos=1)
        assert with_videos.mm_max_toks_per_item["image"] == CAP
        assert (with_videos.mm_max_toks_per_item["video"]
                == _budget(model_dir, None, videos=1).mm_max_toks_per_item["video"])
    # The capacity model reads each backbone's config (InternVL's sizes come as lists) into the
    # KV bytes per token vLLM sizes its cache with: 2 x layers x KV heads x head size x bytes.
    config = stock.model_config
    memory = load_model_memory(model_dir)
    assert memory.kv_bytes_per_token(4) == (2 * config.get_total_num_hidden_layers()
                                            * config.get_total_num_kv_heads()
                                            * config.get_head_size() * 4)


def test_the_presets_parameter_counts_match_the_published_models():
    # LLaVA-1.5-7B: 7.06B; Qwen2.5-VL-7B: 8.29B (their model cards).
    assert abs(load_model_memory("llava-1.5-7b").parameters / 7.06e9 - 1) < 0.01
    assert abs(load_model_memory("qwen2.5-vl-7b").parameters / 8.29e9 - 1) < 0.01
    qwen = model_memory(PRESETS["qwen2.5-vl-7b"])
    assert qwen.image_tokens(1024, 1024) == 37 * 37  # smart_resize to 1036 x 1036
    assert qwen.max_image_tokens() == 16384



KV_LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens "
                     r"per request: ([\d.]+)x")


def check_against_vllms_log(log: str, model_dir, kv_space_gib: float, dtype_bytes: int) -> None:
    """The capacity model's KV figures against what a real engine logged, within 5%."""
    tokens, length, concurrency = KV_LINE.search(log).groups()
    tokens, length = int(tokens.replace(",", "")), int(length.replace(",", ""))
    model = load_model_memory(model_dir)
    predicted = kv_cache_tokens(kv_space_gib * GIB, model.kv_bytes_per_token(dtype_bytes), 16)
    assert abs(predicted / tokens - 1) <= 0.05, (predicted, tokens)
    assert abs(max_concurrency(predicted, length, 16) / float(concurrency) - 1) <= 0.05
