"""Write small Qwen3-VL-shaped model directories with seeded random weights.

The Qwen3-VL counterpart of `devtools.tiny_qwen2_5_vl`: the real architecture at toy width, so
tests can run vLLM and Hugging Face transformers on the same numbers. Kept real: 16-pixel
patches, 2x2 spatial merge (one post-merger token per 32 x 32 pixels), learned position
embeddings interpolated to each image's grid, every vision block attending over the whole image,
DeepStack (the outputs of two intermediate vision blocks, each through its own merger, added to
the hidden states of the LLM's first layers), and an M-RoPE Qwen3 language model with interleaved
sections. The image processor allows up to 144 post-merger tokens per image; the LLM's head_dim is
64, the smallest the CPU attention kernels accept. Same tokenizer and chat template as the
Qwen2.5-VL builder (Qwen3-VL shares the vision tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from devtools.tiny_qwen2_5_vl import (
    CHAT_TEMPLATE,
    ENDOFTEXT,
    IM_END,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    _build_tokenizer,
)
from idselect.tiny_checkpoint import already_written, as_saved, save_model

PATCH = 16
MERGE = 2
# 144 merged tokens at most: 384 x 384 -> 24 x 24 patches -> 12 x 12 post-merger tokens.
MAX_PIXELS = (PATCH * MERGE) ** 2 * 144
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4


@dataclass(frozen=True)
class TinyQwen3VLSpec:
    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 2
    # DeepStack taps after vision blocks 1 and 2 (the real 8B model: 8, 16, 24 of 27).
    deepstack_visual_indexes: tuple[int, ...] = (1, 2)
    num_position_embeddings: int = 576  # a 24 x 24 learned grid
    text_hidden: int = 128
    text_layers: int = 3  # >= the DeepStack levels: each is added after one early layer
    text_heads: int = 2
    text_kv_heads: int = 1
    # Sums to head_dim / 2 = 32 (the real model's 24 : 20 : 20 for 64).
    mrope_section: tuple[int, ...] = field(default=(12, 10, 10))
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    max_pixels: int = MAX_PIXELS
    min_pixels: int = MIN_PIXELS
    initializer_range: float = 0.2  # as the other tiny builders: no near-ties in greedy decoding
    seed: int = 0


def write_tiny_qwen3_vl(out_dir: str | Path, seed: int = 0, spec: TinyQwen3VLSpec | None = None
                        ) -> Path:
    """Write a loadable Qwen3-VL-shaped model directory and return its path (idempotent)."""
    spec = TinyQwen3VLSpec(seed=seed) if spec is None else spec
    out = Path(out_dir)
    spec_json = json.dumps({"model": "qwen3_vl", **spec.__dict__}, sort_keys=True)
    if already_written(out, spec_json):
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t)
           for t in (ENDOFTEXT, IM_END, IMAGE_PAD, VIDEO_PAD, VISION_START, VISION_END)}
    vision = {
        "depth": spec.vision_depth,
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 2,
        "num_heads": spec.vision_heads,
        "in_channels": 3,
        "out_hidden_size": spec.text_hidden,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": 2,
        "num_position_embeddings": spec.num_position_embeddings,
        "deepstack_visual_indexes": list(spec.deepstack_visual_indexes),
        "hidden_act": "gelu_pytorch_tanh",
        "initializer_range": spec.initializer_range,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_hidden * 2,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "head_dim": spec.text_hidden // spec.text_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": list(spec.mrope_section),
            "mrope_interleaved": True,
        },
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]

    torch.manual_seed(spec.seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.float32).eval()

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    mean = std = [0.5, 0.5, 0.5]
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
            image_mean=mean, image_std=std,
        ),
        video_processor=Qwen3VLVideoProcessor(
            size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
            image_mean=mean, image_std=std,
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    save_model(model, out, spec_json, processor, layout=as_saved)
    return out
