"""LLaVA-NeXT (AnyRes) with ID-Selection: K tokens per image across the base view and the tiles.

Placeholders are a fixed function of (image size, K), known before the encoder runs: an image
whose full count (base + unpadded tiles + one newline per unpadded row) exceeds K keeps exactly
min(K, base + unpadded tiles) tokens and drops the newline tokens; otherwise it is served as vLLM
would. [CLS] scores come per 336-px crop, so they are normalised per crop (crops compete on equal
terms), then carried through the same unpad/permute as the features. Kept tokens stay in the
stock order: the base view first, then the unpadded tile grid row by row.
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

from idselect.importance import normalize_scores
from idselect.selection import id_select
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.capture import encode_with_cls_scores
from idselect.vllm_plugin.llava import supports_pruning
from idselect.vllm_plugin.processing import (
    IMPORTANCE_FIELD,
    KEEP_FIELD,
    TEXT_FIELD,
    BudgetInfoMixin,
    BudgetProcessorMixin,
)
from idselect.vllm_plugin.settings import PluginSettings


class IDSelectLlavaNextProcessingInfo(BudgetInfoMixin, LlavaNextProcessingInfo):
    def kept_tokens(self, budget: int, width: int, height: int) -> int:
        return min(budget, self.full_tokens(width, height) - self.newline_tokens(width, height))

    def newline_tokens(self, width: int, height: int) -> int:
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

    def full_tokens_per_item(self, processed: BatchFeature) -> list[int]:
        return [self.full_tokens(int(w), int(h)) for h, w in processed["image_sizes"].tolist()]


class IDSelectLlavaNextMultiModalProcessor(BudgetProcessorMixin, LlavaNextMultiModalProcessor):
    info: IDSelectLlavaNextProcessingInfo


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectLlavaNextMultiModalProcessor,
    info=IDSelectLlavaNextProcessingInfo,
    dummy_inputs=LlavaDummyInputsBuilder,
)
class IDSelectLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """LLaVA-NeXT whose embedding step keeps K tokens per image, chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.idselect_settings = PluginSettings.for_model(vllm_config)
        if not supports_pruning(self.config):
            raise ValueError(
                "idselect prunes LLaVA-NeXT checkpoints with a CLIP tower, the 'default' "
                "feature strategy and one feature layer"
            )
        self._feature_attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn

    def embed_multimodal(self, **kwargs: object):
        budgets = kwargs.pop(KEEP_FIELD, None)
        # Prompt-aware sources are refused by this model's processor: only [CLS] scores arrive.
        kwargs.pop(IMPORTANCE_FIELD, None)
        kwargs.pop(TEXT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if budgets is None or image_input["type"] != "pixel_values":
            return self._process_image_input(image_input)
        budgets = [int(b) for b in torch.as_tensor(budgets).flatten().tolist()]
        if not any(budgets):
            return self._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        image_sizes = image_input["image_sizes"]
        micro = self.idselect_settings.encoder_micro_batch
        # One image (all its crops) per tower pass, at most `micro` crops at a time.
        return [
            self._embed_image(crops, image_sizes[i], budgets[i], micro)
            for i, crops in enumerate(pixel_values)
        ]

    def _embed_image(
        self, crops: torch.Tensor, image_size: torch.Tensor, budget: int, micro: int
    ) -> torch.Tensor:
        tower = partial(self._image_pixels_to_features, self.vision_tower)
        if not budget:
            features = torch.cat([tower(crops[i : i + micro]) for i in range(0, len(crops), micro)])
            return self._merge_image_patch_embeddings(
                image_size, self.multi_modal_projector(features), strategy="spatial_unpad"
            )
        parts = [
            encode_with_cls_scores(tower, self._feature_attn, crops[i : i + micro])
            for i in range(0, len(crops), micro)
        ]
        features = torch.cat([f for f, _ in parts])
        scores = normalize_scores(torch.cat([s for _, s in parts]))  # per crop (row)
        with metrics.timed_selection(features.device, 1):
            scored = torch.cat([features, scores[..., None].to(features.dtype)], -1)
            packed = self._pack_without_newlines(image_size, scored)
            packed_features, packed_scores = packed[:, :-1], packed[:, -1]
            picks = id_select(
                packed_features,
                packed_scores,
                budget,
                gamma=self.idselect_settings.gamma,
                suppression=self.idselect_settings.suppression,
                backend="auto",
            )
        expected = min(budget, packed.shape[0])
        if len(picks) != expected:
            raise RuntimeError(f"idselect selected {len(picks)} tokens, expected {expected}")
        return self.multi_modal_projector(packed_features[picks.to(packed.device)])

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
