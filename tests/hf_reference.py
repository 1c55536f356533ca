"""An independent reference: Hugging Face transformers' LLaVA on the same weights.

Used to check what vLLM + the plugin computes: the vision features and [CLS] attention come from
transformers' own CLIP (eager attention, so attention probabilities are returned), selection from
`idselect.selection.id_select`, and generation is a plain greedy loop over `inputs_embeds`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoProcessor,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
)

from idselect.importance import normalize_scores, text_relevance, unified
from idselect.selection import id_select


class HFLlava:
    model_class = LlavaForConditionalGeneration

    def __init__(self, model_dir: Path) -> None:
        self.model = self.model_class.from_pretrained(
            model_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.image_token_id = self.model.config.image_token_index

    @torch.inference_mode()
    def vision(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature-layer patch features (576, D) and [CLS]->patch attention summed over heads."""
        pixels = self.processor.image_processor(image, return_tensors="pt").pixel_values
        out = self.model.model.vision_tower(
            pixel_values=pixels, output_hidden_states=True, output_attentions=True
        )
        # vision_feature_layer = -2: hidden_states[-2] is the output of layers[-2]
        layer = self.model.config.vision_feature_layer
        features = out.hidden_states[layer][0, 1:]
        attention = out.attentions[layer][0]  # (heads, 577, 577), the same layer
        return features, attention[:, 0, 1:].sum(0)

    @torch.inference_mode()
    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.model.multi_modal_projector(features)

    def image_embeds(
        self,
        image: Image.Image,
        budget: int | None,
        importance: str = "visual",
        text_ids: list[int] | None = None,
    ) -> torch.Tensor:
        """What the LLM should see for one image: the projector on ID-Selection's picks.

        `text`/`unified` importance rank tokens by the cosine of their projection to the prompt's
        input embeddings (`text_ids`: the prompt without image tokens).
        """
        features, scores = self.vision(image)
        scores = self.importance(features, scores, importance, text_ids)
        if budget is not None and budget < features.shape[0]:
            features = features[id_select(features, scores, budget)]
        return self.project(features)

    @torch.inference_mode()
    def importance(
        self, features: torch.Tensor, visual: torch.Tensor, source: str, text_ids: list[int] | None
    ) -> torch.Tensor:
        """The score of each token under an importance source (`cls` is `visual`)."""
        if source in ("visual", "cls"):
            return visual
        text = self.model.get_input_embeddings()(torch.tensor(text_ids))
        relevance = text_relevance(self.project(features), text)
        return relevance if source == "text" else unified(visual, relevance)

    @torch.inference_mode()
    def greedy(self, prompt_ids: list[int], images: list[torch.Tensor], steps: int) -> list[int]:
        """Greedy tokens for a prompt whose image placeholders are filled, in order, by `images`."""
        ids = torch.tensor(prompt_ids)
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.image_token_id).nonzero().flatten()
        filled = torch.cat(images)
        assert len(slots) == len(filled), (len(slots), len(filled))
        embeds[slots] = filled
        lm = self.model.model.language_model
        tokens: list[int] = []
        for _ in range(steps):
            hidden = lm(inputs_embeds=embeds[None]).last_hidden_state[0, -1]
            token = int(self.model.lm_head(hidden).argmax())
            tokens.append(token)
            embeds = torch.cat([embeds, self.model.get_input_embeddings()(torch.tensor([token]))])
        return tokens


class HFLlavaNext(HFLlava):
    """LLaVA-NeXT: per-crop [CLS] scores (normalised per crop), packed by transformers' own
    `pack_image_features` (without newlines) alongside the features."""

    model_class = LlavaNextForConditionalGeneration

    def _pixels(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        processed = self.processor.image_processor(image, return_tensors="pt")
        return processed.pixel_values, processed.image_sizes

    @torch.inference_mode()
    def vision(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, sizes = self._pixels(image)
        out = self.model.model.vision_tower(
            pixel_values=pixels[0], output_hidden_states=True, output_attentions=True
        )
        layer = self.model.config.vision_feature_layer
        features = out.hidden_states[layer][:, 1:]  # (crops, 576, D)
        scores = normalize_scores(out.attentions[layer][:, :, 0, 1:].sum(1))  # per crop
        scored = torch.cat([features, scores[..., None]], -1)
        packed, _ = self.model.model.pack_image_features(
            [scored], sizes, self.model.config.vision_feature_select_strategy, image_newline=None
        )
        (packed,) = packed  # one image
        return packed[:, :-1], packed[:, -1]

    @torch.inference_mode()
    def full_image_embeds(self, image: Image.Image) -> torch.Tensor:
        """transformers' own unpruned path: projected crops, unpadded, with newline tokens."""
        pixels, sizes = self._pixels(image)
        out = self.model.model.get_image_features(pixel_values=pixels, image_sizes=sizes)
        (packed,) = out.pooler_output  # one image, already packed with newlines
        return packed

    def image_embeds(
        self,
        image: Image.Image,
        budget: int | None,
        importance: str = "visual",
        text_ids: list[int] | None = None,
    ) -> torch.Tensor:
        full = self.full_image_embeds(image)
        if budget is None or budget >= full.shape[0]:
            return full
        features, scores = self.vision(image)
        scores = self.importance(features, scores, importance, text_ids)
        return self.project(features[id_select(features, scores, budget)])
