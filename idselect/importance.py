"""Importance scores for visual tokens, computed without any serving engine.

Selection only needs a non-negative score per token. These helpers turn what a vision tower (or
the prompt) already provides into such scores, always in fp32 so that fp16/bf16 towers and their
fp32 references rank tokens the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Literal

import torch
from torch import Tensor

HeadReduce = Literal["sum", "mean"]
TextReduce = Literal["max", "mean"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (half precision and integers are upcast), fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def unit_rows(x: Tensor, *, inplace: bool = False) -> Tensor:
    """L2-normalise the last dim in fp32; all-zero rows stay zero (cosine 0 with everything).

    Rows are first divided by their largest magnitude so that the norm neither overflows for huge
    values nor underflows for tiny ones; the direction, which is all cosine needs, is unchanged.
    `inplace=True` reuses `x` when it already has the compute dtype (the caller must own it):
    the selection hot path then allocates one feature-sized tensor instead of four.
    """
    dtype = _compute_dtype(x.dtype)
    x = x.to(dtype) if inplace else x.to(dtype, copy=True)
    tiny = torch.finfo(dtype).tiny
    peak = torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    x.div_(peak.clamp_min_(tiny))
    return x.div_(torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(tiny))


def normalize_scores(scores: Tensor) -> Tensor:
    """Min-max normalise each row (last dim) to [0, 1]; an all-equal row becomes all ones.

    Step 2 of the ID-Selection spec: every image lands on the same scale, and the zero floor that
    subtractive suppression clamps to means "as unimportant as this image's least important
    token". Result dtype is fp32 (fp64 stays fp64); inputs must be finite with a finite range.
    """
    if not isinstance(scores, Tensor):
        raise ValueError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    s = scores.to(_compute_dtype(scores.dtype))
    if s.dim() == 0 or s.shape[-1] == 0:
        return torch.ones_like(s) if s.dim() == 0 else s.clone()
    low = s.amin(dim=-1, keepdim=True)
    span = s.amax(dim=-1, keepdim=True) - low
    flat = span == 0
    scaled = (s - low) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(scaled), scaled)


def cls_attention(
    q: Tensor,
    k: Tensor,
    num_heads: int,
    scale: float,
    *,
    reduce: HeadReduce = "mean",
) -> Tensor:
    """Attention of the [CLS] query to every patch key: (B, N) visual-saliency scores.

    `q` is (B, Tq, H*hd) and `k` is (B, 1+N, H*hd) as captured from a CLIP attention op; only
    `q[:, 0]` (the [CLS] query) is used, so callers may pass `q[:, :1]`. Per head the CLS logits
    `scale * q_cls . k_t` are softmaxed over all 1+N keys (the CLS key included, as in the tower),
    then the CLS column is dropped. `reduce="sum"` returns the plain per-head sum so that a
    tensor-parallel caller holding a shard of the heads can all-reduce partial sums first (the sum
    differs from the mean only by the constant head count, which min-max normalisation removes).
    """
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 3-D tensor (B, T, heads*head_dim), got {got}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch and width")
    if q.shape[1] < 1 or k.shape[1] < 1:
        raise ValueError("q and k need at least the [CLS] token (T >= 1)")
    if isinstance(num_heads, bool) or not isinstance(num_heads, Integral) or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")
    if k.shape[2] % num_heads:
        raise ValueError(f"num_heads={num_heads} does not divide the width {k.shape[2]}")
    if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")

    batch, tokens, width = k.shape
    head_dim = width // int(num_heads)
    dtype = _compute_dtype(k.dtype)
    q_cls = q[:, 0].to(dtype).reshape(batch, int(num_heads), head_dim)
    keys = k.to(dtype).reshape(batch, tokens, int(num_heads), head_dim)
    logits = torch.einsum("bhd,bthd->bht", q_cls, keys) * float(scale)
    probs = logits.softmax(dim=-1)[..., 1:]
    return probs.sum(dim=1) if reduce == "sum" else probs.mean(dim=1)


def text_relevance(visual: Tensor, text: Tensor, *, reduce: TextReduce = "max") -> Tensor:
    """Prompt relevance of each visual token: cosine to the text tokens, reduced, clamped >= 0.

    This is a pre-LLM approximation of the paper's cross-modal score: inside the image-embedding
    step the language model has not run, so we compare (projected) visual tokens with the prompt's
    input embeddings instead of reading LLM attention. `visual` is (N, D), `text` is (T, D);
    the result is (N,) in fp32, non-negative because importance must be.
    """
    for name, t in (("visual", visual), ("text", text)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor (tokens, D), got {got}")
    if visual.shape[1] != text.shape[1] or visual.shape[1] == 0:
        raise ValueError(
            f"visual {tuple(visual.shape)} and text {tuple(text.shape)} need the same D >= 1"
        )
    if text.shape[0] == 0:
        raise ValueError("text must contain at least one token")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    cos = unit_rows(visual) @ unit_rows(text).to(visual.device).T
    reduced = cos.amax(dim=-1) if reduce == "max" else cos.mean(dim=-1)
    return reduced.clamp_min(0.0)


def unified(*score_tensors: Tensor, weights: Sequence[float] | None = None) -> Tensor:
    """Weighted mean of min-max-normalised scores (e.g. CLS saliency and text relevance).

    Normalising first puts sources with different scales on an equal footing, so `weights` mean
    what they say. The result lies in [0, 1] along the last dim.
    """
    if not score_tensors:
        raise ValueError("unified needs at least one score tensor")
    shape = score_tensors[0].shape if isinstance(score_tensors[0], Tensor) else None
    for i, s in enumerate(score_tensors):
        if not isinstance(s, Tensor) or s.shape != shape:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ValueError(f"score_tensors[{i}] must be a tensor of shape {shape}, got {got}")
    if weights is None:
        weights = [1.0] * len(score_tensors)
    weights = list(weights)
    if len(weights) != len(score_tensors):
        raise ValueError(f"weights has {len(weights)} entries for {len(score_tensors)} tensors")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w < 0:
            raise ValueError(f"weights must be finite and >= 0, got {w!r}")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("weights must not all be zero")
    out = sum(float(w) * normalize_scores(s) for w, s in zip(weights, score_tensors, strict=True))
    return out / total


# Importance for ViTs without [CLS] (Qwen2.5-VL): attention received, or the feature norm.


def attention_received(
    query: torch.Tensor, key: torch.Tensor, scale: float, *, block_elems: int = 1 << 24
) -> torch.Tensor:
    """Mean attention each key receives from all queries of one image, summed over heads.

    `query`, `key`: (n, heads, head_dim) as the attention op sees them (rotary applied). Softmax
    over all n keys per query (the block's own full attention), then the mean over the n
    queries; (n,) in fp32. Queries are processed in chunks so that at most `block_elems`
    probabilities exist at once (a real 7B image has thousands of patches and 16 heads).
    """
    if query.dim() != 3 or query.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must be (n, H, d)")
    q = query.transpose(0, 1).float()
    k = key.transpose(0, 1).float()
    heads, n, _ = q.shape
    received = torch.zeros(heads, n, device=q.device)
    step = max(1, block_elems // max(1, heads * n))
    for start in range(0, n, step):
        logits = torch.matmul(q[:, start : start + step], k.transpose(1, 2)) * float(scale)
        received += logits.softmax(dim=-1).sum(dim=1)
    return received.sum(dim=0) / n


def merge_units(patch_scores: torch.Tensor, unit: int) -> torch.Tensor:
    """Sum consecutive groups of `unit` patch scores (the merger's 2x2 groups in window order)."""
    if patch_scores.shape[-1] % unit:
        raise ValueError(f"{patch_scores.shape[-1]} patches do not form groups of {unit}")
    return patch_scores.reshape(*patch_scores.shape[:-1], -1, unit).sum(dim=-1)


def feature_norm(features: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's features, (N, D) -> (N,) in fp32."""
    return torch.linalg.vector_norm(features.float(), dim=-1)
