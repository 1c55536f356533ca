"""FLOPs of a LLaVA-1.5-style model per image request, with and without visual token pruning.

What pruning changes: the vision tower still encodes every patch (ID-Selection scores them with
its [CLS] attention), but only the K kept tokens go through the projector and into the language
model's prefill, and every decoded token attends to K instead of N visual positions.

Counting conventions (one multiply-add = 2 FLOPs; the usual "2 x parameters per token" rule):
- Linear layers: 2 * tokens * in * out. Biases, norms, activations, softmax, RoPE and residual adds
  are left out (well under 1% for these shapes).
- Vision tower: patch embedding (a 14x14 conv = a linear over 3*14*14 inputs per patch), then the
  encoder layers that actually run. LLaVA takes features from `vision_feature_layer` (-2), so the
  last layer never runs (vLLM does not even build it): 23 of CLIP-ViT-L's 24 layers. Each layer
  sees all N + 1 tokens ([CLS] included); attention is bidirectional: QK^T and AV cost
  2 * S^2 * width each.
- Projector: LLaVA-1.5's 2-layer MLP (vision width -> LM width -> LM width) over the kept tokens.
- Language model prefill over S = text + visual tokens: per layer the Q/K/V/O projections (GQA
  aware), the SwiGLU MLP (3 matrices) and causal attention, QK^T and AV over the S(S+1)/2
  (query, key) pairs a causal mask keeps: 2 * 2 * heads * head_dim * S(S+1)/2. Plus the LM head
  for the one position that produces the first token.
- Decode: one token at context length L: the same linear layers for 1 token, attention over L
  keys, and the LM head.
- Selection: [CLS] scores (2 * N * width) plus the N x N similarity matrix (2 * N * N * width)
  that the greedy picks read (for N above `selection_batch.MATRIX_MAX_TOKENS`, one similarity
  row per pick instead: 2 * K * N * width): tiny next to the encoder, counted for honesty.

"Image-attributable" language model FLOPs are the marginal cost of the visual tokens:
prefill(text + kept) - prefill(text). For LLaVA-1.5-7B, 576 -> 16 tokens cuts them by 97.3% (with
64 text tokens; the linear terms by exactly 1 - 16/576 = 97.2%, the attention terms by more):
the paper's headline arithmetic (">97% fewer FLOPs").

The predicted time-to-first-token speedup of budget K is the ratio of everything that happens
before the first token, full over pruned: encoder + selection + projector + LM prefill. It
assumes time is proportional to FLOPs (true for compute-bound prefill; fixed per-request costs
such as HTTP, image decoding and scheduling are ignored, so a real server sees somewhat less).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from idselect.budget import kept_count

# --------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class VisionShape:
    """A CLIP vision tower as LLaVA uses it."""

    hidden: int
    intermediate: int
    layers_run: int  # encoder layers executed (up to vision_feature_layer)
    heads: int
    image_size: int
    patch_size: int
    channels: int = 3
    drop_cls: bool = True  # vision_feature_select_strategy "default": [CLS] is not a visual token

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def sequence(self) -> int:
        """Tokens inside the tower: patches + [CLS]."""
        return self.patches + 1

    @property
    def visual_tokens(self) -> int:
        """Tokens per image handed to the projector without pruning (576 for LLaVA-1.5)."""
        return self.patches if self.drop_cls else self.sequence


@dataclass(frozen=True)
class TextShape:
    """A Llama-style decoder."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def linear_flops_per_token(self) -> int:
        """2 x the decoder layers' matmul parameters (attention projections + SwiGLU MLP)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        return 2 * self.layers * (q + kv + o + mlp)

    @property
    def lm_head_flops(self) -> int:
        return 2 * self.hidden * self.vocab


@dataclass(frozen=True)
class LlavaShape:
    name: str
    vision: VisionShape
    text: TextShape

    @property
    def visual_tokens(self) -> int:
        return self.vision.visual_tokens


# ------------------------------------------------------------------------------ FLOPs by part


def vision_encoder_flops(v: VisionShape) -> int:
    """One image through the patch embedding and the encoder layers that run."""
    patch_embed = 2 * v.patches * (v.channels * v.patch_size**2) * v.hidden
    s = v.sequence
    linear = 2 * s * (4 * v.hidden * v.hidden + 2 * v.hidden * v.intermediate)
    attention = 2 * 2 * s * s * v.hidden  # QK^T and AV, bidirectional
    return patch_embed + v.layers_run * (linear + attention)


def selection_flops(v: VisionShape, kept: int) -> int:
    """[CLS] importance scores + the similarity the greedy picks read (0 without pruning)."""
    n = v.visual_tokens
    if kept >= n:
        return 0
    from idselect.selection_batch import MATRIX_MAX_TOKENS  # imports torch: only when asked

    rows = n if n <= MATRIX_MAX_TOKENS else kept
    return 2 * n * v.hidden + 2 * rows * n * v.hidden


def projector_flops(shape: LlavaShape, tokens: int) -> int:
    dv, dt = shape.vision.hidden, shape.text.hidden
    return 2 * tokens * (dv * dt + dt * dt)


def _causal_attention_flops(t: TextShape, queries_from: int, queries_to: int) -> int:
    """QK^T + AV for query positions [from, to) attending causally (position p sees p+1 keys)."""
    # sum_{p=from}^{to-1} (p + 1) keys = pairs
    pairs = (queries_to * (queries_to + 1) - queries_from * (queries_from + 1)) // 2
    return t.layers * 2 * 2 * t.heads * t.head_dim * pairs


def llm_prefill_flops(t: TextShape, tokens: int, *, lm_head: bool = True) -> int:
    """Prefill of `tokens` positions; the LM head runs for the last one (the first output)."""
    if tokens <= 0:
        return 0
    return (
        tokens * t.linear_flops_per_token
        + _causal_attention_flops(t, 0, tokens)
        + (t.lm_head_flops if lm_head else 0)
    )


def llm_decode_flops(t: TextShape, context: int) -> int:
    """One decoded token whose attention sees `context` positions (itself included)."""
    return t.linear_flops_per_token + t.layers * 2 * 2 * t.heads * t.head_dim * context + (
        t.lm_head_flops
    )


# ---------------------------------------------------------------------------- per-budget report


def kept_tokens(shape: LlavaShape, budget: int | None) -> int:
    """Visual tokens the LLM prefills for one image (`idselect.budget.kept_count`)."""
    kept = kept_count(budget, shape.visual_tokens)
    return shape.visual_tokens if kept is None else kept


@dataclass(frozen=True)
class FlopsReport:
    """FLOPs of one single-image request at one budget (None = full)."""

    budget: int | None
    visual_tokens: int  # kept
    text_tokens: int
    encoder: int
    selection: int
    projector: int
    llm_prefill: int
    llm_prefill_image: int  # marginal LM prefill cost of the visual tokens
    decode_first_token: int  # FLOPs of the first decoded token after the prompt

    @property
    def prefill_total(self) -> int:
        """Everything before the first token: encoder + selection + projector + LM prefill."""
        return self.encoder + self.selection + self.projector + self.llm_prefill

    def as_dict(self) -> dict:
        return {**asdict(self), "prefill_total": self.prefill_total}


def report(shape: LlavaShape, budget: int | None, text_tokens: int = 64) -> FlopsReport:
    kept = kept_tokens(shape, budget)
    t = shape.text
    prefill = llm_prefill_flops(t, text_tokens + kept)
    return FlopsReport(
        budget=budget,
        visual_tokens=kept,
        text_tokens=text_tokens,
        encoder=vision_encoder_flops(shape.vision),
        selection=selection_flops(shape.vision, kept),
        projector=projector_flops(shape, kept),
        llm_prefill=prefill,
        llm_prefill_image=prefill - llm_prefill_flops(t, text_tokens),
        decode_first_token=llm_decode_flops(t, text_tokens + kept + 1),
    )


def image_prefill_reduction(shape: LlavaShape, budget: int, text_tokens: int = 64) -> float:
    """Fraction of the image-attributable LM prefill FLOPs that budget K removes."""
    full = report(shape, None, text_tokens).llm_prefill_image
    return 1 - report(shape, budget, text_tokens).llm_prefill_image / full


def predicted_ttft_speedup(shape: LlavaShape, budget: int | None, text_tokens: int = 64) -> float:
    """Prefill FLOPs (encoder included) at full budget over those at `budget`."""
    full = report(shape, None, text_tokens).prefill_total
    return full / report(shape, budget, text_tokens).prefill_total


# ------------------------------------------------------------------------------------- configs

# Hugging Face defaults for keys a config.json may leave out (LlamaConfig, CLIPVisionConfig).
_LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "image_size": 224,
    "patch_size": 32,
    "num_channels": 3,
}

# llava-hf/llava-1.5-7b-hf's config.json, the fields that matter here (Vicuna-7B v1.5 text
# model: Llama-2-7B shapes, vocabulary 32064; CLIP-ViT-L/14-336 tower).
LLAVA_15_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "model_type": "llava",
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "text_config": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
    },
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    },
}
LLAVA_15_13B = {
    **LLAVA_15_7B,
    "text_config": {
        **LLAVA_15_7B["text_config"],
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
}
# The CPU benchmark model (benchmarks/realistic_model.py): LLaVA-1.5's tower, a 0.37B Llama.
REALISTIC_CPU = {
    **LLAVA_15_7B,
    "text_config": {
        "model_type": "llama",
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "head_dim": 64,
        "vocab_size": 32064,
    },
}
PRESETS = {
    "llava-1.5-7b": LLAVA_15_7B,
    "llava-1.5-13b": LLAVA_15_13B,
    "realistic-cpu": REALISTIC_CPU,
}


def shape_from_config(config: Mapping | object, name: str = "config") -> LlavaShape:
    """A LlavaShape from a LLaVA config: a dict as in config.json, or a transformers config."""
    if not isinstance(config, Mapping):
        config = config.to_dict()  # transformers PretrainedConfig
    tc = {**_LLAMA_DEFAULTS, **(config.get("text_config") or {})}
    vc = {**_CLIP_VISION_DEFAULTS, **(config.get("vision_config") or {})}
    heads = int(tc["num_attention_heads"])
    text = TextShape(
        hidden=int(tc["hidden_size"]),
        intermediate=int(tc["intermediate_size"]),
        layers=int(tc["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(tc.get("num_key_value_heads") or heads),
        head_dim=int(tc.get("head_dim") or tc["hidden_size"] // heads),
        vocab=int(tc["vocab_size"]),
    )
    layers = int(vc["num_hidden_layers"])
    feature_layer = config.get("vision_feature_layer", -2)
    indices = feature_layer if isinstance(feature_layer, list | tuple) else [feature_layer]
    # vLLM's get_layer_index: the layers needed to produce that hidden state.
    layers_run = max(layers + i + 1 if i < 0 else i for i in indices)
    vision = VisionShape(
        hidden=int(vc["hidden_size"]),
        intermediate=int(vc["intermediate_size"]),
        layers_run=layers_run,
        heads=int(vc["num_attention_heads"]),
        image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]),
        channels=int(vc.get("num_channels", 3)),
        drop_cls=config.get("vision_feature_select_strategy", "default") == "default",
    )
    return LlavaShape(name=name, vision=vision, text=text)


def load_shape(model: str | Path | Mapping) -> LlavaShape:
    """A preset name (`llava-1.5-7b`, `llava-1.5-13b`, `realistic-cpu`), a config.json, a model
    directory holding one, or a config dict."""
    if isinstance(model, Mapping):
        return shape_from_config(model)
    text = str(model)
    if text in PRESETS:
        return shape_from_config(PRESETS[text], name=text)
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{text!r} is neither a preset ({', '.join(PRESETS)}) nor a config.json / model dir"
        )
    name = path.parent.name if path.name == "config.json" else path.stem
    return shape_from_config(json.loads(path.read_text()), name=name)


# --------------------------------------------------------------------------------------- table

DEFAULT_BUDGETS = (None, 192, 128, 64, 32, 16)


def table(shape: LlavaShape, budgets: Iterable[int | None] = DEFAULT_BUDGETS,
          text_tokens: int = 64) -> str:
    """A printable per-budget table (GFLOPs), the rows `idselect flops` shows."""
    v, t = shape.vision, shape.text
    full = report(shape, None, text_tokens)
    lines = [
        f"model: {shape.name}: vision {v.layers_run} layers x {v.hidden} on {v.sequence} tokens "
        f"({v.visual_tokens} visual tokens/image); LM {t.layers} layers x {t.hidden}, "
        f"MLP {t.intermediate}, {t.heads} heads ({t.kv_heads} KV) x {t.head_dim}, vocab {t.vocab}",
        f"one image + {text_tokens} text tokens; GFLOPs (1 multiply-add = 2 FLOPs)",
        "",
        f"{'budget':>7} {'tokens':>6} {'encoder':>9} {'select':>7} {'project':>8} "
        f"{'LM prefill':>11} {'LM image':>9} {'image cut':>9} {'prefill':>9} "
        f"{'decode/tok':>10} {'pred. TTFT speedup':>18}",
    ]
    for budget in budgets:
        r = report(shape, budget, text_tokens)
        cut = 1 - r.llm_prefill_image / full.llm_prefill_image
        lines.append(
            f"{budget or 'full':>7} {r.visual_tokens:>6} {r.encoder / 1e9:>9.1f} "
            f"{r.selection / 1e9:>7.2f} {r.projector / 1e9:>8.2f} {r.llm_prefill / 1e9:>11.1f} "
            f"{r.llm_prefill_image / 1e9:>9.1f} {100 * cut:>8.1f}% {r.prefill_total / 1e9:>9.1f} "
            f"{r.decode_first_token / 1e9:>10.2f} {full.prefill_total / r.prefill_total:>17.2f}x"
        )
    enc_share = full.encoder / full.prefill_total
    lines += [
        "",
        f"at full budget the vision encoder is {100 * enc_share:.1f}% of the prefill FLOPs and the "
        f"language model {100 * full.llm_prefill / full.prefill_total:.1f}%; the encoder runs on "
        "every patch whatever the budget, so no budget can beat "
        f"{full.prefill_total / (full.encoder + llm_prefill_flops(t, text_tokens)):.2f}x.",
    ]
    return "\n".join(lines)
