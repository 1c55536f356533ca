"""LLaVA-NeXT (AnyRes) with ID-Selection: K tokens per image across the base view and the tiles.

What this backbone states (the rest is the framework's and LLaVA-1.5's):
- Counts: an image whose full count (base + unpadded tiles + one newline per unpadded row)
  exceeds K keeps exactly min(K, base + unpadded tiles) tokens and drops the newline tokens;
  otherwise it is served as vLLM would. A fixed function of (image size, K).
- Importance: [CLS] scores come per 336-px crop, so they are normalised per crop (crops compete
  on equal terms), then carried through the same unpad/permute as the features.
- Merge: kept tokens stay in the stock order (the base view first, then the unpadded tile grid
  row by row) and are projected; no newline tokens.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import BatchFeature
from transformers.models.llava_next.modeling_llava_next import (
    get_anyres_image_grid_shape,
    unpad_image,
)
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItem

from idselect.importance import normalize_scores
from idselect.vllm_plugin.capture import encode_with_cls_scores
from idselect.vllm_plugin.embedding import EncodedImages, SelectionModelMixin
from idselect.vllm_plugin.items import ImagePlans
from idselect.vllm_plugin.llava import supports_pruning
from idselect.vllm_plugin.processing import (
    ItemTokens,
    SelectionInfoMixin,
    SelectionProcessorMixin,
)


class IDSelectLlavaNextProcessingInfo(SelectionInfoMixin, LlavaNextProcessingInfo):
    def item_tokens(self, processed: BatchFeature) -> list[ItemTokens]:
        out = []
        for height, width in processed["image_sizes"].tolist():
            full = self.get_num_image_tokens(image_width=int(width), image_height=int(height))
            out.append(ItemTokens(full, full - self._newline_tokens(int(width), int(height))))
        return out

    def _newline_tokens(self, width: int, height: int) -> int:
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(height, width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=height,
            original_width=width,
            npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        return newlines


class IDSelectLlavaNextMultiModalProcessor(
    SelectionProcessorMixin, LlavaNextMultiModalProcessor
):
    info: IDSelectLlavaNextProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectLlavaNextMultiModalProcessor,
    info=IDSelectLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class IDSelectLlavaNextForConditionalGeneration(
    SelectionModelMixin, LlavaNextForConditionalGeneration
):
    """LLaVA-NeXT whose embedding step keeps K tokens per image, chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not supports_pruning(self.config):
            raise ValueError(
                "idselect prunes LLaVA-NeXT checkpoints with a CLIP tower, the 'default' "
                "feature strategy and one feature layer"
            )
        self._init_selection(vllm_config, "LLaVA-NeXT")
        self._feature_attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn

    def _vision_inputs(self, kwargs: dict[str, object]):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is not None:
            yield image_input, image_input["type"] == "pixel_values"

    def _embed_as_vllm(self, image_input):
        return self._process_image_input(image_input)

    def _num_images(self, image_input) -> int:
        return len(image_input["pixel_values"])

    def _encode_images(self, image_input, part: slice, plans: ImagePlans) -> EncodedImages:
        sizes = image_input["image_sizes"][part]
        encoded = [
            self._encode(crops, size, keep is not None)
            for crops, size, keep in zip(image_input["pixel_values"][part], sizes, plans.keeps,
                                         strict=True)
        ]
        units = [u for u, _ in encoded]
        scores = [s for _, s in encoded] if plans.any_pruned() else None
        return EncodedImages(units, scores, lambda i: self.multi_modal_projector(units[i]),
                             state=sizes)

    def _merge_kept(self, encoded: EncodedImages, picks) -> list[torch.Tensor]:
        return [
            self._merge_image_patch_embeddings(
                size, self.multi_modal_projector(u), strategy="spatial_unpad"
            )
            if idx is None
            else self.multi_modal_projector(u.index_select(0, idx))
            for u, size, idx in zip(encoded.units, encoded.state, picks, strict=True)
        ]

    def _encode(
        self, crops: torch.Tensor, image_size: torch.Tensor, pruned: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """An image's crops through the tower, at most `micro` crops per pass.

        Unpruned: the features (crops, 576, C) and no scores. Pruned: the selection units, packed
        in vLLM's AnyRes order without newlines (N, C), and their [CLS] scores normalised per
        crop, packed the same way (N,).
        """
        tower = partial(self._image_pixels_to_features, self.vision_tower)
        micro = self.idselect_settings.encoder_micro_batch
        batches = [crops[i : i + micro] for i in range(0, len(crops), micro)]
        if not pruned:
            return torch.cat([tower(b) for b in batches]), None
        encoded = [encode_with_cls_scores(tower, self._feature_attn, b) for b in batches]
        features = torch.cat([f for f, _ in encoded])
        scores = normalize_scores(torch.cat([s for _, s in encoded]))  # per crop (row)
        units = self._pack_without_newlines(image_size, features)
        return units, self._pack_without_newlines(image_size, scores[..., None])[:, 0]

    def _pack_without_newlines(self, image_size: torch.Tensor, crops: torch.Tensor) -> torch.Tensor:
        """Per-crop tokens (crops, 576, C) in vLLM's AnyRes order, unpadded, without newlines."""
        base = crops[0]
        if crops.shape[0] == 1:
            return base
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        height, width = image_size.tolist()
        rows, cols = get_anyres_image_grid_shape(
            (height, width), self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )
        tiles = crops[1 : 1 + rows * cols].view(rows, cols, side, side, -1)
        grid = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
        grid = unpad_image(grid, (height, width))
        return torch.cat([base, grid.flatten(1, 2).transpose(0, 1)])

    def _pruned_lora_token_counts(
        self, mm_kwargs: MultiModalKwargsItem, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        patches = (self.config.vision_config.image_size // self.config.vision_config.patch_size)
        return len(mm_kwargs["pixel_values"].data) * patches**2, num_mm_embeds
