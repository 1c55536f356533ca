"""Write small InternVL-shaped (Hugging Face format) model directories with seeded random weights.

The InternVL counterpart of `devtools.tiny_qwen2_5_vl`: the real architecture of the `-hf`
checkpoints (`InternVLForConditionalGeneration`: an InternViT tower with [CLS], learned absolute
position embeddings and layer scale; pixel shuffle 0.5; a LayerNorm-MLP projector; a Qwen2
language model) at toy width, so tests can run vLLM (which serves it through its `interns1.py`)
and Hugging Face transformers on the same numbers. Geometry that matters is kept real: 448-pixel
tiles of 14-pixel patches (32 x 32 = 1024 patches + [CLS]), pixel shuffle to 16 x 16 = 256 tokens
per tile, the last vision layer as the feature layer, and dynamic tiling (GOT-OCR2 style: a grid of
up to `max_patches` tiles chosen by aspect ratio, plus a 448 x 448 thumbnail when the grid has
more than one tile). `max_patches` is 4 here (the real models use 12) so an image costs at most
5 tiles = 1280 tokens and two of them fit in a 4096-token CPU engine.

The image processor config sets `crop_to_patches: true`: vLLM counts an image's tokens (and sizes
its profiling) from the image processor's own attributes, while transformers' processor turns
tiling on through its call defaults; with the attribute false the two would disagree.

The tokenizer carries the processor's special tokens (`<img>`, `</img>`, `<IMG_CONTEXT>`,
`<video>`) as `extra_special_tokens`, which InternVLProcessor reads by name. The language model's
head_dim is 64, the smallest the CPU attention kernels accept. Weights are saved as
transformers 5 writes them (`model.vision_tower.*`, `model.multi_modal_projector.*`,
`model.language_model.*`, `lm_head.*`), the layout of the `OpenGVLab/InternVL3-*-hf` checkpoints.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from devtools.tiny_qwen2_5_vl import _CORPUS, ENDOFTEXT, IM_END, IM_START
from idselect.tiny_checkpoint import already_written, as_saved, save_model

START_IMAGE = "<img>"
END_IMAGE = "</img>"
IMAGE_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"
_SPECIALS = [ENDOFTEXT, IM_START, IM_END, START_IMAGE, END_IMAGE, IMAGE_CONTEXT, VIDEO]

# The chat template of OpenGVLab/InternVL3-*-hf (Qwen2 chat markers; an image part is one
# `<IMG_CONTEXT>` that the processor expands to `<img>` + 256 x tiles `<IMG_CONTEXT>` + `</img>`),
# with a short default system prompt and `image_url` parts accepted like `image`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or content['type'] == 'image_url' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'video' %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_SIZE = 448
PATCH = 14
DOWNSAMPLE_RATIO = 0.5
# (448 / 14)^2 * 0.5^2 = 256 LLM tokens per tile.
TOKENS_PER_TILE = int((IMAGE_SIZE // PATCH) ** 2 * DOWNSAMPLE_RATIO**2)
# InternVL's image statistics (ImageNet's, not CLIP's).
IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True)
class TinyInternVLSpec:
    """Sizes of the generated model; defaults keep a CPU engine start well under a minute."""

    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    text_kv_heads: int = 1
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    min_patches: int = 1
    max_patches: int = 4
    # Wider than transformers' 0.02 so greedy decoding does not hinge on near-ties (as in
    # idselect.tiny_checkpoint); [CLS] and the position embeddings, which transformers
    # initialises to zeros, are drawn from the same normal so the [CLS] attention is not flat.
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
    # Qwen2 tokenizers add no BOS. InternVLProcessor reads the four image/video tokens (and their
    # ids) from these attribute names.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens={
            "start_image_token": START_IMAGE,
            "end_image_token": END_IMAGE,
            "context_image_token": IMAGE_CONTEXT,
            "video_token": VIDEO,
        },
        chat_template=CHAT_TEMPLATE,
        model_max_length=8192,
    )


def write_tiny_internvl(
    out_dir: str | Path, seed: int = 0, spec: TinyInternVLSpec | None = None
) -> Path:
    """Write a loadable InternVL-shaped model directory and return its path.

    Idempotent: an existing directory written with the same spec is left as it is, so tests can
    call this freely. `seed` overrides `spec.seed`.
    """
    spec = TinyInternVLSpec(seed=seed) if spec is None else spec
    if spec.seed != seed:
        spec = TinyInternVLSpec(**{**spec.__dict__, "seed": seed})
    out = Path(out_dir)
    spec_json = json.dumps({"model": "internvl", **spec.__dict__}, sort_keys=True)
    if already_written(out, spec_json):
        return out
    out.mkdir(parents=True, exist_ok=True)

    import torch
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    tokenizer = _build_tokenizer(spec.vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _SPECIALS}
    # InternViT-300M's structure (the tower of InternVL3-1B/2B/8B): LayerNorm, biased q/k/v, no
    # q/k norm, layer scale, no final norm (use_mean_pooling), GELU MLP.
    vision = {
        "hidden_size": spec.vision_hidden,
        "intermediate_size": spec.vision_hidden * 4,
        "num_hidden_layers": spec.vision_layers,
        "num_attention_heads": spec.vision_heads,
        "image_size": [IMAGE_SIZE, IMAGE_SIZE],
        "patch_size": [PATCH, PATCH],
        "num_channels": 3,
        "attention_bias": True,
        "use_qk_norm": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "layer_scale_init_value": 0.1,
        "use_absolute_position_embeddings": True,
        "use_mask_token": False,
        "use_mean_pooling": True,
        "initializer_range": spec.initializer_range,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": spec.text_hidden,
        "intermediate_size": spec.text_hidden * 2,
        "num_hidden_layers": spec.text_layers,
        "num_attention_heads": spec.text_heads,
        "num_key_value_heads": spec.text_kv_heads,
        "head_dim": spec.text_hidden // spec.text_heads,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_window_layers": spec.text_layers,
        "rms_norm_eps": 1e-6,
        "initializer_range": spec.initializer_range,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": None,
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[ENDOFTEXT],
        "tie_word_embeddings": False,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[IMAGE_CONTEXT],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE_RATIO,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    config.initializer_range = spec.initializer_range
    config.architectures = ["InternVLForConditionalGeneration"]

    torch.manual_seed(spec.seed)
    model = InternVLForConditionalGeneration(config).to(torch.float32).eval()
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():  # transformers initialises both to zeros
        embeddings.cls_token.normal_(0.0, spec.initializer_range)
        embeddings.position_embeddings.normal_(0.0, spec.initializer_range)

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    tiling = {
        "crop_to_patches": True,
        "min_patches": spec.min_patches,
        "max_patches": spec.max_patches,
    }
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(
            size=size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, **tiling
        ),
        video_processor=InternVLVideoProcessor(
            size=size, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
        ),
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )
    save_model(model, out, spec_json, processor, layout=as_saved)
    return out
