"""Write small Qwen2.5-VL-shaped model directories with seeded random weights.

The counterpart of `idselect.tiny_checkpoint` for Qwen2.5-VL: the real architecture (windowed ViT
with
full-attention blocks, 2x2 patch merger, M-RoPE Qwen2 language model) at toy width, so tests can
run vLLM and Hugging Face transformers on the same numbers. Geometry that matters is kept real:
14-pixel patches, 2x2 spatial merge, 112-pixel attention windows (so window reordering happens),
and an image processor whose `max_pixels` allows up to 144 post-merger tokens per image (a 336 x
336 image gives a 12 x 12 grid; non-square images give non-square grids, which exercise M-RoPE).
The language model's head_dim is 64, the smallest the CPU attention kernels accept.

Weights are saved as transformers 5 writes them (`model.visual.*`, `model.language_model.*`,
`lm_head.*`), the layout of current Hub checkpoints; both transformers and vLLM 0.32 load it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from idselect.tiny_checkpoint import already_written, as_saved, save_model

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
_SPECIALS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, "<|vision_pad|>", IMAGE_PAD,
             VIDEO_PAD]

# Qwen2-VL's own chat template (as shipped with Qwen/Qwen2.5-VL-*-Instruct).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "system\nYou are a helpful assistant.\nuser\nWhat is in the image?\nassistant\n",
    "A cat sitting on a red chair next to a window. Describe the picture in detail.",
    "There is a dog, a tree, a car and a blue sky with clouds. Compare the two pictures.",
    "How many people are there? Two people are walking along the beach at sunset.",
    "the quick brown fox jumps over the lazy dog 0123456789 .,:;!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
]

PATCH = 14
MERGE = 2
# 144 merged tokens at most: 336 x 336 -> 24 x 24 patches -> 12 x 12 post-merger tokens.
MAX_PIXELS = (PATCH * MERGE) ** 2 * 144
MIN_PIXELS = (PATCH * MERGE) ** 2 * 4


@dataclass(frozen=True)
class TinyQwen2_5_VLSpec:
    """Sizes of the generated model; defaults keep a CPU engine start well under a minute."""

    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 2
    # Blocks 1 and 3 attend over the whole image, 0 and 2 within 112-pixel windows (the real
    # model has 32 blocks with full attention in 7, 15, 23, 31).
    fullatt_block_indexes: tuple[int, ...] = (1, 3)
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    # Sums to head_dim / 2 = 32, in the real model's 1 : 1.5 : 1.5 proportion.
    mrope_section: tuple[int, ...] = field(default=(8, 12, 12))
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    max_pixels: int = MAX_PIXELS
    min_pixels: int = MIN_PIXELS
    # Wider than transformers' 0.02 so greedy decoding does not hinge on near-ties (as in
    # idselect.tiny_checkpoint).
    initializer_range: float = 0.2
    seed: int = 0


def _build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    # Qwen2 tokenizers add no BOS.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={
            "image_token": IMAGE_PAD,
            "video_token": VIDEO_PAD,
            "vision_bos_token": VISION_START,
            "vision_eos_token": VISION_END,
        },
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )


def write_tiny_qwen2_5_vl(
    out_dir: str | Path, seed: int = 0, spec: TinyQwen2_5_VLSpec | None = None
) -> Path:
    """Write a loadable Qwen2.5-VL-shaped model directory and return its path.

    Idempotent: an existing directory written with the same spec is left as it is, so tests can
    call this freely. `seed` overrides `spec.seed`.
    """
    spec = TinyQwen2_5_VLSpec(seed=seed) if spec is None else spec
    if spec.seed != seed:
        spec = TinyQwen2_5_VLSpec(**{**spec.__dict__, "seed": seed})
    out = Path(out_dir)
    spec_json = json.dumps({"model": "qwen2_5_vl", **spec.__dict__}, sort_keys=True)
    if already_written(out, spec_json):
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = _build_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
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
        "window_size": 112,
        "fullatt_block_indexes": list(spec.fullatt_block_indexes),
        "tokens_per_second": 2,
        "hidden_act": "silu",
        "initializer_range": spec.initializer_range,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_hidden * 2,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.text_layers,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1000000.0,
            "mrope_section": list(spec.mrope_section),
        },
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
    }
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]

    torch.manual_seed(spec.seed)
    model = Qwen2_5_VLForConditionalGeneration(config).to(torch.float32).eval()

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    mean = [0.48145466, 0.4578275, 0.40821073]
    std = [0.26862954, 0.26130258, 0.27577711]
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(
            size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
            image_mean=mean, image_std=std,
        ),
        video_processor=Qwen2VLVideoProcessor(
            size=size, patch_size=PATCH, merge_size=MERGE, temporal_patch_size=2,
            image_mean=mean, image_std=std,
        ),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    save_model(model, out, spec_json, processor, layout=as_saved)
    return out
