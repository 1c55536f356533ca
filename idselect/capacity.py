"""How many one-image requests fit on a GPU at once, per visual token budget and maximum budget.

A request holds KV cache for its whole sequence: text + the visual tokens its image keeps +
the tokens it generates. vLLM reserves for the KV cache what is left of the GPU after the
weights and its memory profile; its encoder cache (the kept embeddings waiting for prefill)
holds `max(max_num_batched_tokens, tokens of the largest image)` tokens of the LM's width.
Pruning shrinks every request's KV footprint; a maximum budget (`--max-visual-token-budget`)
also bounds the largest image, so requests that send no budget are bounded too and the encoder
cache holds more images.

Computed from the model's config (engine-free), with these assumptions, stated in the output:
- weights at the serving dtype (`dtype_bytes`), parameters counted from the config;
- `overhead_gib` for vLLM's profiled activations, CUDA graphs and the allocator (not computed);
- KV per token = 2 (K and V) x layers x KV heads x head dim x dtype bytes; the KV cache is
  whole blocks of `block_size` tokens, and a request takes whole blocks;
- requests in flight are also capped by vLLM's `--max-num-seqs` (256 by default), shown apart.

`kv_cache_tokens` and `max_concurrency` are vLLM's own start-up figures ("KV cache size: N
tokens", "Maximum concurrency for L tokens per request"); tests/test_server.py checks them
against what a real engine logs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from idselect.budget import kept_count
from idselect.flops import LLAVA_15_7B

GIB = 1024**3

# Qwen/Qwen2.5-VL-7B-Instruct's config.json and preprocessor_config.json, the fields used here.
QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    },
    "preprocessor": {"min_pixels": 3136, "max_pixels": 12845056},
}
PRESETS = {"llava-1.5-7b": LLAVA_15_7B, "qwen2.5-vl-7b": QWEN2_5_VL_7B}


@dataclass(frozen=True)
class ModelMemory:
    """What the capacity model needs to know about a model."""

    name: str
    parameters: int
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int  # the LM's width (encoder cache rows)
    family: str  # "llava" or "qwen-vl"
    image_tokens_fixed: int | None = None  # LLaVA: every image costs the same
    patch: int = 14
    merge: int = 2
    max_pixels: int = 12845056
    min_pixels: int = 3136

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def image_tokens(self, width: int, height: int) -> int:
        """Visual tokens vLLM's stock model gives an image of this size."""
        if self.image_tokens_fixed is not None:
            return self.image_tokens_fixed
        factor = self.patch * self.merge  # Qwen-VL's smart_resize, as its processor does
        h, w = max(factor, round(height / factor) * factor), max(factor,
                                                                  round(width / factor) * factor)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = math.floor(height / beta / factor) * factor
            w = math.floor(width / beta / factor) * factor
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return (h // factor) * (w // factor)

    def max_image_tokens(self) -> int:
        """Tokens of the largest image vLLM accepts (what it reserves for without a cap)."""
        if self.image_tokens_fixed is not None:
            return self.image_tokens_fixed
        return self.max_pixels // (self.patch * self.merge) ** 2


def _text_config(config: Mapping) -> Mapping:
    return config.get("text_config") or config


def _llm_parameters(tc: Mapping) -> int:
    hidden, inter, layers = tc["hidden_size"], tc["intermediate_size"], tc["num_hidden_layers"]
    heads = tc["num_attention_heads"]
    kv_heads = tc.get("num_key_value_heads") or heads
    head_dim = tc.get("head_dim") or hidden // heads
    attention = hidden * heads * head_dim * 2 + 2 * hidden * kv_heads * head_dim
    per_layer = attention + 3 * hidden * inter + 2 * hidden
    embeddings = tc["vocab_size"] * hidden * (1 if tc.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings


def model_memory(config: Mapping, name: str = "config") -> ModelMemory:
    """The capacity model's view of a LLaVA-1.5 or Qwen2.5-VL config (config.json as a dict);
    other LLaVA-like configs (LLaVA-NeXT, InternVL) are read as one fixed-size tile per image."""
    tc = _text_config(config)
    heads = tc["num_attention_heads"]
    common = {
        "name": name,
        "layers": tc["num_hidden_layers"],
        "kv_heads": tc.get("num_key_value_heads") or heads,
        "head_dim": tc.get("head_dim") or tc["hidden_size"] // heads,
        "hidden": tc["hidden_size"],
    }
    vc = config["vision_config"]
    if "depth" in vc:  # the Qwen-VL ViT
        width, inter = vc["hidden_size"], vc["intermediate_size"]
        merged = width * vc["spatial_merge_size"] ** 2
        vision = (vc["depth"] * (4 * width * width + 3 * width * inter)
                  + merged * merged + merged * vc["out_hidden_size"]
                  + 3 * vc.get("temporal_patch_size", 2) * vc["patch_size"] ** 2 * width)
        pre = config.get("preprocessor", {})
        return ModelMemory(
            parameters=_llm_parameters(tc) + vision, family="qwen-vl",
            patch=vc["patch_size"], merge=vc["spatial_merge_size"],
            max_pixels=pre.get("max_pixels", 12845056), min_pixels=pre.get("min_pixels", 3136),
            **common)
    width, inter = vc["hidden_size"], vc["intermediate_size"]
    vision = (vc["num_hidden_layers"] * (4 * width * width + 2 * width * inter)
              + width * tc["hidden_size"] + tc["hidden_size"] ** 2)  # tower + 2-layer projector
    size, patch = (v[0] if isinstance(v, list) else v for v in (vc["image_size"], vc["patch_size"]))
    patches = (size // patch) ** 2
    if "downsample_ratio" in config:  # InternVL's pixel shuffle: 256 tokens per 448-px tile
        patches = int(patches * config["downsample_ratio"] ** 2)
    return ModelMemory(parameters=_llm_parameters(tc) + vision, family="llava",
                       image_tokens_fixed=patches, **common)


def load_model_memory(model: str | Path | Mapping) -> ModelMemory:
    """A preset (`llava-1.5-7b`, `qwen2.5-vl-7b`), a config.json or model dir, or a dict."""
    if isinstance(model, Mapping):
        return model_memory(model)
    if str(model) in PRESETS:
        return model_memory(PRESETS[str(model)], name=str(model))
    path = Path(model)
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{model!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                                "config.json / model directory")
    return model_memory(json.loads(path.read_text()), name=path.parent.name)


def kv_cache_tokens(kv_bytes: float, bytes_per_token: int, block_size: int) -> int:
    """Tokens the KV cache holds: whole blocks of `block_size` tokens."""
    return int(kv_bytes // (bytes_per_token * block_size)) * block_size


def max_concurrency(cache_tokens: int, tokens_per_request: int, block_size: int) -> float:
    """Requests of this length the cache holds at once (each takes whole blocks), as vLLM
    reports it."""
    return cache_tokens / (math.ceil(tokens_per_request / block_size) * block_size)


@dataclass(frozen=True)
class GPU:
    memory_gib: float = 80.0
    utilization: float = 0.9
    dtype_bytes: int = 2
    overhead_gib: float = 3.0  # profiled activations, CUDA graphs, allocator: assumed
    block_size: int = 16
    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256


@dataclass(frozen=True)
class Capacity:
    budget: int | None
    cap: int | None
    visual_tokens: int  # the image keeps
    tokens_per_request: int
    kv_cache_tokens: int
    requests: int  # fit in the KV cache
    requests_in_flight: int  # also under --max-num-seqs
    encoder_cache_tokens: int
    encoder_cache_images: int  # largest images the encoder cache holds at once


def capacity(model: ModelMemory, gpu: GPU, budget: int | None, cap: int | None,
             image_tokens: int, text_tokens: int = 64, output_tokens: int = 256) -> Capacity:
    """One-image requests that fit at once, for requests sending `budget` (None: none sent)
    on a server whose maximum budget is `cap` (None: no maximum)."""
    effective = budget if budget is not None else cap
    kept = kept_count(effective, image_tokens)
    visual = image_tokens if kept is None else kept
    weights = model.parameters * gpu.dtype_bytes
    kv_bytes = gpu.memory_gib * GIB * gpu.utilization - weights - gpu.overhead_gib * GIB
    largest = model.max_image_tokens() if cap is None else min(cap, model.max_image_tokens())
    encoder = max(gpu.max_num_batched_tokens, largest)
    kv_bytes -= encoder * model.hidden * gpu.dtype_bytes
    tokens = kv_cache_tokens(kv_bytes, model.kv_bytes_per_token(gpu.dtype_bytes),
                             gpu.block_size)
    per_request = text_tokens + visual + output_tokens
    fit = int(max_concurrency(tokens, per_request, gpu.block_size))
    return Capacity(budget, cap, visual, per_request, tokens, fit, min(fit, gpu.max_num_seqs),
                    encoder, encoder // largest)


def table(model: ModelMemory, gpu: GPU, budgets: Sequence[int | None],
          caps: Sequence[int | None], image: tuple[int, int] = (1024, 1024),
          text_tokens: int = 64, output_tokens: int = 256) -> str:
    """The rows `idselect capacity` prints (markdown)."""
    image_tokens = model.image_tokens(*image)
    weights_gib = model.parameters * gpu.dtype_bytes / GIB
    lines = [
        f"{model.name}: {model.parameters / 1e9:.2f}B parameters ({weights_gib:.1f} GiB at "
        f"{gpu.dtype_bytes} bytes), KV {model.kv_bytes_per_token(gpu.dtype_bytes) // 1024} KiB "
        f"per token; {gpu.memory_gib:g} GiB GPU x {gpu.utilization} utilization, "
        f"{gpu.overhead_gib:g} GiB assumed for activations and graphs; one {image[0]}x{image[1]} "
        f"image ({image_tokens} visual tokens) + {text_tokens} text + {output_tokens} generated "
        "tokens per request",
        "",
        "| budget sent | max budget | visual tokens | tokens/request | KV cache tokens | "
        f"requests that fit | in flight (max-num-seqs {gpu.max_num_seqs}) | encoder cache: "
        "tokens / largest images |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cap in caps:
        for budget in budgets:
            if cap is not None and budget is not None and budget > cap:
                continue  # refused by the server
            c = capacity(model, gpu, budget, cap, image_tokens, text_tokens, output_tokens)
            lines.append(
                f"| {budget or 'none (full)'} | {cap or 'none'} | {c.visual_tokens} "
                f"| {c.tokens_per_request} | {c.kv_cache_tokens:,} | {c.requests:,} "
                f"| {c.requests_in_flight} | {c.encoder_cache_tokens:,} / "
                f"{c.encoder_cache_images} |")
    return "\n".join(lines)
