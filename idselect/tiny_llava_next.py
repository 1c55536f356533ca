"""Write a small LLaVA-NeXT-shaped (AnyRes) model directory with seeded random weights.

Same idea as `tiny_model.py`: the real CLIP-ViT/14-336 geometry (576 patches per 336 crop) with
narrow layers, so AnyRes tiling, unpadding and newline tokens behave as in LLaVA-NeXT, at a size a
2-core CPU engine serves in seconds. The grid pinpoints are limited to 1x2, 2x1 and 2x2 crops.
"""

from __future__ import annotations

import json
from pathlib import Path

from idselect.tiny_model import (
    CHAT_TEMPLATE,
    IMAGE_TOKEN,
    TinyLlavaSpec,
    build_tokenizer,
    hub_layout,
)

GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672]]


def write_tiny_llava_next(out_dir: str | Path, spec: TinyLlavaSpec | None = None) -> Path:
    """Write a loadable LLaVA-NeXT-shaped model directory (idempotent) and return its path."""
    import torch
    from safetensors.torch import save_file
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    spec = spec or TinyLlavaSpec()
    out = Path(out_dir)
    marker = out / "idselect_tiny_spec.json"
    spec_json = json.dumps({"arch": "llava_next", **spec.__dict__}, sort_keys=True)
    if marker.exists() and marker.read_text() == spec_json:
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.vocab_size)
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 4,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=336,
        patch_size=14,
        projection_dim=spec.text_hidden,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_hidden * 2,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_heads,
        head_dim=spec.text_hidden // spec.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max(spec.max_position_embeddings, 8192),
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
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
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(hub_layout(model.state_dict()), out / "model.safetensors", metadata={"format": "pt"})

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    marker.write_text(spec_json)
    return out
