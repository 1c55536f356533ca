"""Which visual score should rank Qwen3-VL's tokens? The measurement behind docs/qwen3_vl.md.

    python -m benchmarks.qwen3_vl_importance [--model DIR] [--images 24]

Runs transformers' Qwen3-VL tower (eager attention) on structured test images and compares the
candidate scores with the default (attention received in the last block, summed over each 2x2
group): rank agreement (Spearman), top-16 overlap, overlap of ID-Selection's K=16 / K=36 picks,
and coverage (mean cosine of every token to its nearest kept token, K=16). Without a real
checkpoint (none can be downloaded here) the default model is the tiny seeded one: random weights
show how far the candidates differ, not which one is better.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from idselect.importance import unit_rows
from idselect.selection import id_select

SIZES = [(384, 384), (448, 224), (224, 416), (320, 320)]


def _image(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((h // 6 + 1, w // 6 + 1, 1), dtype=np.uint8))[:h, :w]
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def _coverage(features: torch.Tensor, kept: torch.Tensor) -> float:
    u = unit_rows(features)
    return float((u @ u[kept].T).amax(dim=1).mean())


@torch.inference_mode()
def candidates(model, processor, image) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Post-merger features (N, D) and every candidate score (N,)."""
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

    inputs = processor.image_processor(images=[image], return_tensors="pt")
    visual = model.model.visual
    received: list[torch.Tensor] = []

    def hook(module, args, kwargs, _output) -> None:  # the block's own q, k (rotary applied)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        probs = (torch.einsum("qhd,khd->hqk", q, k) * module.scaling).softmax(dim=-1)
        received.append(probs.mean(dim=1).sum(dim=0))  # mean over queries, summed over heads

    handles = [b.attn.register_forward_hook(hook, with_kwargs=True) for b in visual.blocks]
    try:
        out = visual(inputs.pixel_values, grid_thw=inputs.image_grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    unit = visual.spatial_merge_size**2
    scores = {f"attention, block {b}": r.reshape(-1, unit).sum(-1) for b, r in enumerate(received)}
    scores["post-merger L2 norm"] = out.pooler_output.norm(dim=-1)
    for level, feature in enumerate(out.deepstack_features):
        scores[f"DeepStack level {level} L2 norm"] = feature.norm(dim=-1)
    mean = out.pooler_output.mean(dim=0, keepdim=True)
    scores["distance from mean feature"] = (out.pooler_output - mean).norm(dim=-1)
    return out.pooler_output, scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Qwen3-VL model directory (default: the tiny one)")
    parser.add_argument("--images", type=int, default=24)
    args = parser.parse_args()
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    model_dir = args.model
    if model_dir is None:
        from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl

        model_dir = write_tiny_qwen3_vl(Path(tempfile.gettempdir()) / "idselect-tiny-qwen3-vl")
    model = Qwen3VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    default = f"attention, block {model.config.vision_config.depth - 1}"
    rows: dict[str, list[list[float]]] = {}
    for i in range(args.images):
        features, scores = candidates(model, processor, _image(i, SIZES[i % len(SIZES)]))
        ref = scores[default]
        ref16, ref36 = id_select(features, ref, 16), id_select(features, ref, 36)
        for name, s in scores.items():
            k16, k36 = id_select(features, s, 16), id_select(features, s, 36)
            rows.setdefault(name, []).append([
                _spearman(s, ref), _overlap(s.topk(16).indices, ref.topk(16).indices),
                _overlap(k16, ref16), _overlap(k36, ref36), _coverage(features, k16),
            ])
    print(f"{args.images} images, compared with `{default}` (the default)\n")
    print("| source | Spearman | top-16 overlap | ID-Sel. K=16 overlap | K=36 overlap | "
          "coverage K=16 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, values in rows.items():
        m = np.mean(values, axis=0)
        print(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[3]:.2f} | {m[4]:.2f} |")


if __name__ == "__main__":
    main()
