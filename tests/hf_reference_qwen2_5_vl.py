"""An independent reference: Hugging Face transformers' Qwen2.5-VL on the same weights.

What vLLM + the plugin computes is checked against this: post-merger features from transformers'
own vision tower; importance recomputed from transformers' own attention inputs of the last
full-attention block (its q/k projection and rotary embedding, softmax per image); selection by
`idselect.selection.id_select`; positions from transformers' `get_rope_index` for the FULL prompt
with the pruned image tokens' columns dropped (so kept tokens sit at their original (t, h, w));
generation as a plain greedy loop over `inputs_embeds` and explicit 3-D position ids.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

from idselect.importance import text_relevance, unified
from idselect.selection import id_select


@dataclass
class Vision:
    features: torch.Tensor  # (full, D) post-merger tokens, raster order
    scores: torch.Tensor  # (full,) attention received in the last full-attention block
    grid_thw: torch.Tensor  # (3,)


def run_with_received_attention(visual, block, pixel_values, grid, rotary):
    """Run a Qwen-VL tower on one image; also return the attention each patch receives in
    `block` (mean over queries, summed over heads), recomputed from the block's own q/k."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs, _output) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        n = hidden.shape[0]
        q, k, _ = module.qkv(hidden).reshape(n, 3, module.num_heads, -1).permute(1, 0, 2, 3)
        q, k = rotary(q, k, cos, sin)
        logits = torch.einsum("qhd,khd->hqk", q, k) * module.scaling
        seen.append(logits.softmax(dim=-1).mean(dim=1).sum(dim=0))

    handle = block.register_forward_hook(hook, with_kwargs=True)
    try:
        out = visual(pixel_values, grid_thw=grid)
    finally:
        handle.remove()
    (patch_scores,) = seen  # one image: one full-attention segment
    return out, patch_scores


class HFQwen2_5_VL:
    model_class = Qwen2_5_VLForConditionalGeneration

    def __init__(self, model_dir: Path) -> None:
        self.model = self.model_class.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.config = self.model.config
        self.image_token_id = self.config.image_token_id
        self.merge = self.config.vision_config.spatial_merge_size
        self._cache: dict[str, Vision] = {}

    @torch.inference_mode()
    def vision(self, image: Image.Image) -> Vision:
        key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = inputs.image_grid_thw
        visual = self.model.model.visual
        block = visual.blocks[max(self.config.vision_config.fullatt_block_indexes)].attn
        out, patch_scores = run_with_received_attention(
            visual, block, inputs.pixel_values, grid, apply_rotary_pos_emb_vision
        )  # window order
        unit = self.merge**2
        window_scores = patch_scores.reshape(-1, unit).sum(dim=-1)
        cfg = self.config.vision_config
        window_index, _ = get_vision_window_index(
            grid, spatial_merge_size=self.merge, window_size=cfg.window_size,
            patch_size=cfg.patch_size,
        )
        scores = torch.empty_like(window_scores)
        scores[window_index] = window_scores
        result = Vision(out.pooler_output, scores, grid[0])
        self._cache[key] = result
        return result

    def picks(
        self,
        image: Image.Image,
        budget: int | None,
        importance: str = "visual",
        text_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """Indices of the kept post-merger tokens (all of them without a budget).

        `text`/`unified` rank tokens by the cosine of the post-merger features (already in the
        LLM's embedding space) to the prompt's input embeddings (`text_ids`: the prompt without
        its vision tokens)."""
        v = self.vision(image)
        units = self.units(v)
        if budget is None or budget >= units.shape[0]:
            return torch.arange(units.shape[0])
        scores = v.scores
        if importance in ("text", "unified"):
            with torch.inference_mode():
                text = self.model.get_input_embeddings()(torch.tensor(text_ids))
                relevance = text_relevance(units, text)
            scores = relevance if importance == "text" else unified(scores, relevance)
        return id_select(units, scores, budget)

    def units(self, v: Vision) -> torch.Tensor:
        """The features similarity and text relevance are measured on."""
        return v.features

    def text_ids(self, ids: list[int]) -> list[int]:
        """A prompt's ids without its vision tokens (what prompt-aware importance reads)."""
        c = self.config
        vision = {c.image_token_id, c.video_token_id, c.vision_start_token_id,
                  c.vision_end_token_id}
        return [t for t in ids if t not in vision]

    @torch.inference_mode()
    def pruned_prompt(
        self,
        prompt: str,
        images: list[Image.Image],
        budgets: list[int | None],
        importance: str = "visual",
    ) -> tuple[list[int], torch.Tensor, list[torch.Tensor]]:
        """Token ids, (3, L) positions and per-image kept embeddings of the pruned prompt."""
        full = self.processor(text=[prompt], images=images, return_tensors="pt")
        ids = full.input_ids[0]
        text_ids = self.text_ids(ids.tolist())
        positions, _ = self.model.model.get_rope_index(
            full.input_ids, full.mm_token_type_ids, image_grid_thw=full.image_grid_thw
        )
        positions = positions[:, 0]
        keep = torch.ones_like(ids, dtype=torch.bool)
        slots = (ids == self.image_token_id).nonzero().flatten()
        embeds, start = [], 0
        for image, budget in zip(images, budgets, strict=True):
            v = self.vision(image)
            n = v.features.shape[0]
            picks = self.picks(image, budget, importance, text_ids)
            mask = torch.zeros(n, dtype=torch.bool)
            mask[picks] = True
            keep[slots[start : start + n]] = mask
            embeds.append(v.features[picks])
            start += n
        assert start == len(slots)
        return ids[keep].tolist(), positions[:, keep], embeds

    @torch.inference_mode()
    def greedy(
        self, ids: list[int], positions: torch.Tensor, images: list[torch.Tensor], steps: int
    ) -> list[int]:
        """Greedy tokens; image slots filled in order by `images`; text continues after max."""
        ids_t = torch.tensor(ids)
        embed = self.model.get_input_embeddings()
        embeds = embed(ids_t)
        slots = (ids_t == self.image_token_id).nonzero().flatten()
        filled = torch.cat(images)
        assert len(slots) == len(filled), (len(slots), len(filled))
        embeds[slots] = filled
        lm = self.model.model.language_model
        next_pos = int(positions.max()) + 1
        tokens: list[int] = []
        for _ in range(steps):
            out = lm(inputs_embeds=embeds[None], position_ids=positions[:, None])
            token = int(self.model.lm_head(out.last_hidden_state[0, -1]).argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
            positions = torch.cat([positions, torch.full((3, 1), next_pos)], dim=1)
            next_pos += 1
        return tokens

    def expected(
        self, prompt: str, images: list[Image.Image], budgets: list[int | None], steps: int
    ) -> tuple[list[int], list[int]]:
        """(pruned prompt token ids, greedy tokens) that vLLM + idselect must reproduce."""
        ids, positions, embeds = self.pruned_prompt(prompt, images, budgets)
        return ids, self.greedy(ids, positions, embeds, steps)
