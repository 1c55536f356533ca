"""Write small LLaVA-1.5-shaped model directories with seeded random weights.

No hub is reachable on our CI and demo machines, so tests and the demo build their own model: a
real CLIP-ViT/14-336 geometry (576 patch tokens + [CLS], so budgets behave exactly as on
LLaVA-1.5) with narrow layers, a Llama text model whose head_dim (64) the CPU attention kernels
accept, a byte-level BPE tokenizer with `<image>` and a chat template, and a CLIP image processor.
Weights are seeded so Hugging Face transformers and vLLM can be compared on the same numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_TOKEN = "<image>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_CORPUS = [
    "USER: What is in the image? ASSISTANT: A cat sitting on a red chair next to a window.",
    "Describe the picture in detail. There is a dog, a tree, a car and a blue sky with clouds.",
    "How many people are there? Two people are walking along the beach at sunset.",
    "the quick brown fox jumps over the lazy dog 0123456789 .,:;!?'\"()[]{}<>-_/\\@#$%^&*+=~`|",
]


@dataclass(frozen=True)
class TinyLlavaSpec:
    """Sizes of the generated model; defaults keep a CPU engine start under a minute."""

    vision_hidden: int = 128
    vision_layers: int = 3
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    # A wider init than transformers' 0.02 spreads the logits, so greedy decoding does not hinge on
    # near-ties that tiny fp32 differences between two engines could flip.
    initializer_range: float = 0.2
    seed: int = 0


def build_tokenizer(vocab_size: int, corpus: list[str] = _CORPUS):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def hub_layout(state_dict: dict) -> dict:
    """Name tensors as llava-hf checkpoints on the Hub do (`...vision_tower.vision_model.*`).

    transformers 5 flattens CLIPVisionModel in memory and would save `vision_tower.embeddings.*`,
    a layout no real checkpoint has and vLLM 0.32 does not load; transformers reads both.
    """
    prefix = "model.vision_tower."
    return {
        (prefix + "vision_model." + k[len(prefix) :] if k.startswith(prefix) else k): v.contiguous()
        for k, v in state_dict.items()
    }


def as_saved(state_dict: dict) -> dict:
    """Tensor names as transformers 5 has them (the Hub layout of the newer architectures)."""
    return {k: v.contiguous() for k, v in state_dict.items()}


def clip_and_llama_configs(spec: TinyLlavaSpec, tokenizer, max_positions: int | None = None):
    """CLIP-ViT/14-336 geometry with narrow layers, and a Llama text model sized by `spec`."""
    from transformers import CLIPVisionConfig, LlamaConfig

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
        max_position_embeddings=max_positions or spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return vision, text


CLIP_IMAGE_STATS = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}


def already_written(out: Path, spec_json: str) -> bool:
    """Written before with the same spec? (The marker is written last, after every file.)"""
    return (out / "idselect_tiny_spec.json").exists() and (
        out / "idselect_tiny_spec.json"
    ).read_text() == spec_json


def save_model(model, out: Path, spec_json: str, processor, layout=hub_layout) -> None:
    """Config, generation config, safetensors (tensor names by `layout`: LLaVA's Hub layout by
    default), processor files, then the marker."""
    from safetensors.torch import save_file

    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(layout(model.state_dict()), out / "model.safetensors", metadata={"format": "pt"})
    processor.save_pretrained(out)
    (out / "idselect_tiny_spec.json").write_text(spec_json)


def write_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec()) -> Path:
    """Write a loadable LLaVA-1.5-shaped model directory and return its path.

    Idempotent: an existing directory written with the same spec is left as it is, so tests and
    the demo can call this freely.
    """
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    spec_json = json.dumps(spec.__dict__, sort_keys=True)
    if already_written(out, spec_json):
        return out
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(spec.vocab_size)
    vision, text = clip_and_llama_configs(spec, tokenizer)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=576,
        tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]

    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, **CLIP_IMAGE_STATS
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    save_model(model, out, spec_json, processor)
    return out
