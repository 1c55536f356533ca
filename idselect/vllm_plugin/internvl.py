"""InternVL (Hugging Face format) with ID-Selection: K tokens per image across tiles and thumbnail.

vLLM 0.32 serves `InternVLForConditionalGeneration` checkpoints with its `interns1.py` model; these
classes subclass it on the framework's mixins. What this backbone states:

- Selection unit: the post-pixel-shuffle token (2x2 InternViT patches of a 448-px tile, the unit
  the LLM sees), 256 per tile, across the image's tiles in raster order and then the thumbnail.
  An image keeps exactly `min(K, tiles * 256)`, a fixed function of (image size, K) known
  before the encoder runs. Similarity on the pre-projector tokens; the kept ones are projected.
- Importance (`visual`): the [CLS]->patch attention of the tower's last layer (the layer whose
  features vLLM uses), summed over heads and over each 2x2 group (through the model's own pixel
  shuffle, so a token sums exactly the patches it is made of), then min-max normalised per tile
  (a tile's [CLS] attends within its tile only, so tiles compete on equal terms).
- Structure tokens: an image stays `<img>` + K `<IMG_CONTEXT>` + `</img>`.
- Tensor parallelism: this tower's attention is replicated on every rank (plain linear q/k/v,
  all heads), so its scores need no all-reduce (untested here: single-process CPU tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.model_executor.models.interns1 import (
    InternS1DummyInputsBuilder,
    InternS1ForConditionalGeneration,
    InternS1MultiModalProcessor,
    InternS1ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItem
from vllm.multimodal.processing import PromptUpdateDetails

from idselect.importance import cls_attention, normalize_scores
from idselect.vllm_plugin.capture import capture_qk, single_call
from idselect.vllm_plugin.compat import overrides_vllm
from idselect.vllm_plugin.embedding import EncodedImages, SelectionModelMixin
from idselect.vllm_plugin.items import ImagePlans
from idselect.vllm_plugin.processing import (
    ItemTokens,
    SelectionInfoMixin,
    SelectionProcessorMixin,
    without_our_kwargs,
)


class IDSelectInternVLProcessingInfo(SelectionInfoMixin, InternS1ProcessingInfo):
    def item_tokens(self, processed: BatchFeature) -> list[ItemTokens]:
        per_tile = self.get_hf_processor().image_seq_length
        return [ItemTokens(n * per_tile, n * per_tile)
                for n in processed["image_num_patches"].tolist()]

    def full_tokens(self, width: int, height: int, mm_kwargs: Mapping[str, object]) -> int:
        return self.get_num_image_tokens(
            image_width=width,
            image_height=height,
            processor=self.get_hf_processor(**mm_kwargs),
            mm_kwargs=mm_kwargs,
        )


class IDSelectInternVLMultiModalProcessor(SelectionProcessorMixin, InternS1MultiModalProcessor):
    info: IDSelectInternVLProcessingInfo

    @overrides_vllm
    def _apply_hf_processor_main(self, mm_items, hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # vLLM's InternVL processor calls the HF processor itself, once per image.
        return super()._apply_hf_processor_main(mm_items, without_our_kwargs(hf_kwargs))

    def pruned_replacement(self, stock: PromptUpdateDetails, keep: int) -> PromptUpdateDetails:
        context = self.info.get_hf_processor().image_token_id
        start, end = stock.full[0], stock.full[-1]  # <img> ... </img>
        return PromptUpdateDetails.select_token_id([start, *[context] * keep, end], context)

    def placeholder_token_ids(self) -> Sequence[int]:
        p = self.info.get_hf_processor()
        return (p.image_token_id, p.start_image_token_id, p.end_image_token_id)


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectInternVLMultiModalProcessor,
    info=IDSelectInternVLProcessingInfo,
    dummy_inputs=InternS1DummyInputsBuilder,
)
class IDSelectInternVLForConditionalGeneration(
    SelectionModelMixin, InternS1ForConditionalGeneration
):
    """InternVL whose image embeddings are K tokens per image chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_selection(vllm_config, "InternVL")
        # vLLM's `extract_feature` always uses the tower's last layer (and drops [CLS]).
        self._feature_attn = self.vision_tower.encoder.layer[-1].attention.attn

    def _vision_inputs(self, kwargs: dict[str, object]):
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if mm_input is not None:
                yield mm_input, modality == "images" and mm_input["type"] == "pixel_values"

    def _embed_as_vllm(self, mm_input):
        return self._process_vision_input(mm_input)

    def _num_images(self, image_input) -> int:
        return len(image_input["num_patches"])

    def _encode_images(self, image_input, part: slice, plans: ImagePlans) -> EncodedImages:
        tiles = [int(n) for n in torch.as_tensor(image_input["num_patches"]).tolist()]
        pixels = torch.split(image_input["pixel_values"], tiles)[part]
        units, scores = self._encode(torch.cat(pixels), tiles[part])
        return EncodedImages(units, scores, lambda i: self.multi_modal_projector(units[i]))

    def _merge_kept(self, encoded: EncodedImages, picks) -> list[torch.Tensor]:
        return [self.multi_modal_projector(u if p is None else u.index_select(0, p))
                for u, p in zip(encoded.units, picks, strict=True)]

    def _encode(
        self, pixels: torch.Tensor, tiles: list[int]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per image: its pre-projector tokens (tiles * 256, 4C) and their scores, normalised
        per tile; as vLLM's `extract_feature`, without the projector."""
        with capture_qk(self._feature_attn) as captured:
            hidden = self.vision_tower(pixel_values=pixels)
        query, key = single_call(captured, "the InternViT feature layer's attention")
        attn = self._feature_attn
        patch_scores = cls_attention(query[:, :1], key, attn.num_heads, attn.scale, reduce="sum")
        tokens = self._shuffle(hidden[:, 1:])
        scores = normalize_scores(self._shuffle(patch_scores[..., None]).sum(dim=-1))
        per_image = [n * tokens.shape[1] for n in tiles]
        return (list(torch.split(tokens.flatten(0, 1), per_image)),
                list(torch.split(scores.flatten(), per_image)))

    def _shuffle(self, patches: torch.Tensor) -> torch.Tensor:
        """(tiles, P, C) -> (tiles, P/4, 4C) by the model's own pixel shuffle."""
        side = int(patches.shape[1] ** 0.5)
        grid = patches.reshape(patches.shape[0], side, side, -1)
        shuffled = self.pixel_shuffle(grid, scale_factor=self.downsample_ratio)
        return shuffled.reshape(patches.shape[0], -1, shuffled.shape[-1])

    def _pruned_lora_token_counts(
        self, mm_kwargs: MultiModalKwargsItem, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        patches = (self.config.vision_config.image_size[0] //
                   self.config.vision_config.patch_size[0]) ** 2
        return int(mm_kwargs["image_num_patches"].data) * patches, num_mm_embeds
