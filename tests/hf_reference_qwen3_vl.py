"""An independent reference: Hugging Face transformers' Qwen3-VL on the same weights.

As the Qwen2.5-VL reference, with what differs: importance from the attention inputs of the
tower's last block (every block attends over the whole image; tokens are in raster order, no
windows); each token's row is its main merger output followed by its DeepStack rows (one per
level, from transformers' own `deepstack_features`), so keeping a token keeps its DeepStack rows;
the greedy loop hands the kept tokens' DeepStack rows to transformers' text model, which adds them
to the hidden states of its first layers at the image positions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from tests.hf_reference_qwen2_5_vl import HFQwen2_5_VL, Vision, run_with_received_attention


class HFQwen3VL(HFQwen2_5_VL):
    model_class = Qwen3VLForConditionalGeneration

    def __init__(self, model_dir: Path) -> None:
        super().__init__(model_dir)
        self.dim = self.config.vision_config.out_hidden_size
        self.levels = len(self.config.vision_config.deepstack_visual_indexes)

    @torch.inference_mode()
    def vision(self, image: Image.Image) -> Vision:
        key = hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        inputs = self.processor.image_processor(images=[image], return_tensors="pt")
        grid = inputs.image_grid_thw
        visual = self.model.model.visual
        block = visual.blocks[-1].attn
        out, patch_scores = run_with_received_attention(
            visual, block, inputs.pixel_values, grid, apply_rotary_pos_emb_vision
        )  # raster order: no windows
        scores = patch_scores.reshape(-1, self.merge**2).sum(dim=-1)
        rows = torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)
        result = Vision(rows, scores, grid[0])
        self._cache[key] = result
        return result

    def units(self, v: Vision) -> torch.Tensor:
        return v.features[:, : self.dim]

    @torch.inference_mode()
    def greedy(
        self, ids: list[int], positions: torch.Tensor, images: list[torch.Tensor], steps: int
    ) -> list[int]:
        """Greedy tokens; image slots filled in order by the main rows of `images`, their
        DeepStack rows added in the first layers; text continues after max."""
        ids_t = torch.tensor(ids)
        embed = self.model.get_input_embeddings()
        embeds = embed(ids_t)
        mask = ids_t == self.image_token_id
        filled = torch.cat(images)
        assert int(mask.sum()) == len(filled), (int(mask.sum()), len(filled))
        embeds[mask] = filled[:, : self.dim]
        deepstack = list(filled[:, self.dim :].split(self.dim, dim=-1))
        assert len(deepstack) == self.levels
        lm = self.model.model.language_model
        next_pos = int(positions.max()) + 1
        tokens: list[int] = []
        for _ in range(steps):
            visual_mask = torch.nn.functional.pad(mask, (0, embeds.shape[0] - mask.shape[0]))
            out = lm(inputs_embeds=embeds[None], position_ids=positions[:, None],
                     visual_pos_masks=visual_mask[None], deepstack_visual_embeds=deepstack)
            token = int(self.model.lm_head(out.last_hidden_state[0, -1]).argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
            positions = torch.cat([positions, torch.full((3, 1), next_pos)], dim=1)
            next_pos += 1
        return tokens
