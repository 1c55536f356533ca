"""An independent reference: Hugging Face transformers' InternVL (HF format) on the same weights.

What vLLM + the plugin computes for InternVL is checked against this. Everything comes from
transformers' own modules: tiles from the processor (GOT-OCR2 dynamic tiling: the grid tiles in
raster order, then the thumbnail when there is more than one tile), patch features and [CLS]
attention from the vision tower run eagerly (`output_attentions`), the 2x2 grouping from the
model's own `pixel_shuffle`, projection from its projector, selection from
`idselect.selection.id_select`, and generation as a plain greedy loop over `inputs_embeds`.

The unit the LLM sees is a post-pixel-shuffle token: with 32 x 32 patches per 448 tile
(patch p = 32 r + c), token t = 16 i + j of a tile concatenates the features of patches
(2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1), in that order (p, p+1, p+32, p+33 for
p = 64 i + 2 j). Its visual importance is the [CLS]->patch attention of the feature layer,
summed over heads and over those four patches, then min-max normalised per tile (a tile's
[CLS] only attends within its tile, so raw scores of different tiles are not comparable).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, InternVLForConditionalGeneration

from idselect.importance import normalize_scores, text_relevance, unified
from idselect.selection import id_select


@dataclass
class Tower:
    pixels: torch.Tensor  # (tiles, 3, 448, 448), as the processor produces them
    patches: torch.Tensor  # (tiles, 1024, D) feature-layer patch features, [CLS] dropped
    attention: torch.Tensor  # (tiles, 1024) [CLS]->patch attention, summed over heads


class HFInternVL:
    def __init__(self, model_dir: Path) -> None:
        self.model = InternVLForConditionalGeneration.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.config = self.model.config
        self.image_token_id = self.config.image_token_id
        self.ratio = self.config.downsample_ratio
        if self.config.vision_feature_select_strategy != "default":
            raise ValueError("only the 'default' strategy ([CLS] dropped) is pixel-shuffleable")
        self._cache: dict[str, Tower] = {}

    # -- the processor ------------------------------------------------------------------------

    def tiles(self, image: Image.Image) -> tuple[torch.Tensor, int]:
        """Pixel values per tile (tiles, then the thumbnail) and the image's `<IMG_CONTEXT>` count.

        The count is read from the processor's own prompt expansion of one image token.
        """
        processor = self.processor
        out = processor(text=processor.image_token, images=[image], return_tensors="pt")
        ids = out.input_ids[0]
        count = int((ids == self.image_token_id).sum())
        pixels = out.pixel_values
        assert count == processor.image_seq_length * pixels.shape[0], (count, pixels.shape)
        assert ids[0] == processor.start_image_token_id and ids[-1] == processor.end_image_token_id
        return pixels, count

    def prompt_ids(self, prompt: str, images: list[Image.Image]) -> list[int]:
        """The processor's expansion of a prompt (one `<IMG_CONTEXT>` per image) into token ids."""
        out = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        return out.input_ids[0].tolist()

    # -- the vision tower ---------------------------------------------------------------------

    def _attention_index(self) -> int:
        """Index into `attentions` of the layer whose output `vision_feature_layer` selects.

        `hidden_states` has one more entry than there are layers (the embeddings come first), so
        entry h is the output of layer h - 1.
        """
        layer = self.config.vision_feature_layer
        layers = self.config.vision_config.num_hidden_layers
        if not isinstance(layer, int) or layer % (layers + 1) == 0:
            raise ValueError("the feature layer must be one vision layer's output")
        return layer % (layers + 1) - 1

    @torch.inference_mode()
    def tower(self, image: Image.Image) -> Tower:
        key = hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()
        if key in self._cache:
            return self._cache[key]
        pixels, _ = self.tiles(image)
        out = self.model.model.vision_tower(
            pixel_values=pixels, output_hidden_states=True, output_attentions=True
        )
        layer = self.config.vision_feature_layer
        # As InternVLModel.get_image_features: the last layer's output (after the tower's final
        # norm) for -1, otherwise that hidden state; [CLS] dropped.
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        attention = out.attentions[self._attention_index()]  # (tiles, heads, 1025, 1025)
        result = Tower(pixels, hidden[:, 1:], attention[:, :, 0, 1:].sum(dim=1))
        self._cache[key] = result
        return result

    def shuffle(self, patches: torch.Tensor) -> torch.Tensor:
        """(tiles, P, D) patch rows -> (tiles, P/4, 4D) tokens, by the model's own pixel shuffle."""
        tiles, count, dim = patches.shape
        side = int(count**0.5)
        assert side * side == count, count
        grid = patches.reshape(tiles, side, side, dim)
        out = self.model.model.pixel_shuffle(grid, scale_factor=self.ratio)
        return out.reshape(tiles, -1, out.shape[-1])

    def group(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(tiles, P) per-patch scores -> (tiles, P/4) per-token sums over each 2x2 group.

        The scores go through the same pixel shuffle as the features (as a 1-channel map), so
        token t sums exactly the patches whose features token t concatenates.
        """
        return self.shuffle(patch_scores[..., None]).sum(dim=-1)

    @torch.inference_mode()
    def vision(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pre-projector tokens (N, 4D) in the LLM's order, their scores (N,), and tile per token.

        Scores: [CLS]->patch attention of the feature layer, summed over heads and each 2x2
        group, min-max normalised per tile.
        """
        t = self.tower(image)
        tokens = self.shuffle(t.patches)  # (tiles, 256, 4D)
        scores = normalize_scores(self.group(t.attention))  # (tiles, 256), per tile
        tiles, per_tile = scores.shape
        tile_of_token = torch.arange(tiles).repeat_interleave(per_tile)
        return tokens.reshape(tiles * per_tile, -1), scores.reshape(-1), tile_of_token

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    @torch.inference_mode()
    def full_image_embeds(self, image: Image.Image) -> torch.Tensor:
        """transformers' own unpruned path (`get_image_features`), flattened: (tiles * 256, H)."""
        pixels, _ = self.tiles(image)
        out = self.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        return out.pooler_output.reshape(-1, out.pooler_output.shape[-1])

    @torch.inference_mode()
    def importance(
        self, features: torch.Tensor, visual: torch.Tensor, source: str, text_ids: list[int] | None
    ) -> torch.Tensor:
        """The score of each token under an importance source (`cls` is `visual`); `text` and
        `unified` rank by the cosine of the projected tokens to the prompt's input embeddings."""
        if source in ("visual", "cls"):
            return visual
        text = self.model.get_input_embeddings()(torch.tensor(text_ids))
        relevance = text_relevance(self.project(features), text)
        return relevance if source == "text" else unified(visual, relevance)

    def image_embeds(
        self,
        image: Image.Image,
        budget: int | None,
        importance: str = "visual",
        text_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """What the LLM should see for one image: the projector on ID-Selection's picks (in
        order), or transformers' own unpruned embeddings when the budget covers every token."""
        features, scores, _ = self.vision(image)
        if budget is None or budget >= features.shape[0]:
            full = self.full_image_embeds(image)
            mine = self.project(features)
            assert full.shape == mine.shape, (full.shape, mine.shape)
            torch.testing.assert_close(mine, full, rtol=1e-5, atol=1e-5)
            return full
        scores = self.importance(features, scores, importance, text_ids)
        return self.project(features[id_select(features, scores, budget)])

    def text_ids(self, ids: list[int]) -> list[int]:
        """A prompt's ids without its image tokens (what prompt-aware importance reads)."""
        p = self.processor
        vision = {p.image_token_id, p.start_image_token_id, p.end_image_token_id}
        return [t for t in ids if t not in vision]

    # -- the language model -------------------------------------------------------------------

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], images_embeds: list[torch.Tensor], steps: int
               ) -> list[int]:
        """Greedy tokens for a prompt whose `<IMG_CONTEXT>` slots are filled, in order, by
        `images_embeds` (one (n_i, H) tensor per image)."""
        ids = torch.tensor(prompt_ids)
        embed = self.model.get_input_embeddings()
        embeds = embed(ids)
        slots = (ids == self.image_token_id).nonzero().flatten()
        filled = torch.cat(images_embeds) if images_embeds else embeds[:0]
        assert len(slots) == len(filled), (len(slots), len(filled))
        embeds[slots] = filled
        lm = self.model.model.language_model
        tokens: list[int] = []
        for _ in range(steps):
            hidden = lm(inputs_embeds=embeds[None]).last_hidden_state[0, -1]
            token = int(self.model.lm_head(hidden).argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, embed(torch.tensor([token]))])
        return tokens
