"""Write a small LLaVA-NeXT-shaped (AnyRes) model directory with seeded random weights.

Same idea as `tiny_model.py`: the real CLIP-ViT/14-336 geometry (576 patches per 336 crop) with
narrow layers, so AnyRes tiling, unpadding and newline tokens behave as in LLaVA-NeXT, at a size a
2-core CPU engine serves in seconds. The grid pinpoints are limited to 1x2, 2x1 and 2x2 crops.
"""

from __future__ import annotations

import json
from pathlib import Path

from idselect.tiny_checkpoint import (
    CHAT_TEMPLATE,
    CLIP_IMAGE_STATS,
    IMAGE_TOKEN,
    TinyLlavaSpec,
    already_written,
    build_tokenizer,
    clip_and_llama_configs,
    save_model,
)

GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672]]


def write_tiny_llava_next(out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """Write a loadable LLaVA-NeXT-shaped model directory (idempotent) and return its path."""
    import torch
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    spec_json = json.dumps({"arch": "llava_next", **spec.__dict__}, sort_keys=True)
    if already_written(out, spec_json):
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.vocab_size)
    # AnyRes images are up to 2,928 tokens: room for two of them plus text.
    vision, text = clip_and_llama_configs(spec, tokenizer, max_positions=8192)
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=GRID_PINPOINTS,
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaNextForConditionalGeneration"]

    torch.manual_seed(spec.seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():  # transformers leaves image_newline uninitialised
        model.model.image_newline.normal_(0.0, spec.initializer_range)
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=GRID_PINPOINTS,
        **CLIP_IMAGE_STATS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    save_model(model, out, spec_json, processor)
    return out
