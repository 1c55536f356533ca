"""LLaVA-1.5 with ID-Selection: K placeholders per image, K embeddings chosen from the image's own.

Mirrors vLLM's `model_executor/models/llava.py` split: ProcessingInfo (counts), the
MultiModalProcessor (the framework's, unchanged), and the model (embedding step). What this
backbone states: the selection unit is the CLIP patch feature of the feature layer, importance is
that layer's [CLS]->patch attention, and kept features are projected in raster order. Only CLIP
towers with the "default" feature strategy (LLaVA-1.5 checkpoints) are pruned; other
LLaVA-architecture checkpoints (Pixtral-HF, SigLIP towers) keep vLLM's stock behaviour and refuse
a budget.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItem
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    InputProcessingContext,
)

from idselect.vllm_plugin.capture import encode_with_cls_scores
from idselect.vllm_plugin.embedding import EncodedImages, SelectionModelMixin
from idselect.vllm_plugin.items import ImagePlans
from idselect.vllm_plugin.processing import (
    ItemTokens,
    SelectionInfoMixin,
    SelectionProcessorMixin,
    UnprunedProcessorMixin,
)
from idselect.vllm_plugin.settings import PluginSettings


def supports_pruning(hf_config) -> bool:
    """ID-Selection needs [CLS] attention: a CLIP tower whose [CLS] is dropped from the features."""
    return (
        isinstance(hf_config.vision_config, CLIPVisionConfig)
        and hf_config.vision_feature_select_strategy == "default"
        and isinstance(hf_config.vision_feature_layer, int)
    )


class IDSelectLlavaProcessingInfo(SelectionInfoMixin, LlavaProcessingInfo):
    def item_tokens(self, processed: BatchFeature) -> list[ItemTokens]:
        # Every image is resized to the tower's input: the count does not depend on its size.
        size = self.get_image_size_with_most_features()
        full = self.get_num_image_tokens(image_width=size.width, image_height=size.height)
        return [ItemTokens(full, full)] * len(processed["pixel_values"])


class IDSelectLlavaMultiModalProcessor(SelectionProcessorMixin, LlavaMultiModalProcessor):
    info: IDSelectLlavaProcessingInfo


class UnprunedPixtralProcessor(UnprunedProcessorMixin, PixtralHFMultiModalProcessor):
    """Pixtral-HF towers have no [CLS]: served unpruned, and options are refused."""


class UnprunedLlavaProcessor(UnprunedProcessorMixin, LlavaMultiModalProcessor):
    """LLaVA variants without a pruneable tower (SigLIP, "full" strategy): the same."""


def _build_info(ctx: InputProcessingContext):
    from transformers import LlavaConfig, PixtralVisionConfig

    hf_config = ctx.get_hf_config(LlavaConfig)
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return IDSelectLlavaProcessingInfo(ctx)


def _build_processor(info, dummy_inputs: BaseDummyInputsBuilder) -> BaseMultiModalProcessor:
    if isinstance(info, PixtralHFProcessingInfo):
        return UnprunedPixtralProcessor(info, dummy_inputs)
    if supports_pruning(info.get_hf_config()):
        return IDSelectLlavaMultiModalProcessor(info, dummy_inputs)
    return UnprunedLlavaProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class IDSelectLlavaForConditionalGeneration(SelectionModelMixin, LlavaForConditionalGeneration):
    """LLaVA whose image-embedding step keeps K tokens per image, chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._prunes = supports_pruning(self.config)
        defaults = PluginSettings.from_hf_config(self.config).defaults.as_kwargs()
        if not self._prunes and defaults:
            raise ValueError(
                f"default {', '.join(defaults)} set, but this checkpoint's vision tower cannot be "
                "pruned by idselect (it needs a CLIP tower with the 'default' feature strategy)"
            )
        if self._prunes:
            self._init_selection(vllm_config, "LLaVA-1.5")
            # With vision_feature_layer=-2 vLLM builds the tower up to the feature layer.
            self._feature_attn = self.vision_tower.vision_model.encoder.layers[-1].self_attn

    def _vision_inputs(self, kwargs: dict[str, object]):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is not None:
            yield image_input, self._prunes and image_input["type"] == "pixel_values"

    def _embed_as_vllm(self, image_input):
        return self._process_image_input(image_input)

    def _num_images(self, image_input) -> int:
        return len(image_input["pixel_values"])

    def _num_patches(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def _encode_images(self, image_input, part: slice, plans: ImagePlans) -> EncodedImages:
        tower = partial(self._image_pixels_to_features, self.vision_tower)
        pixel_values = image_input["pixel_values"][part]
        if not plans.any_pruned():
            features, scores = list(tower(pixel_values)), None
        else:
            features, scores = encode_with_cls_scores(tower, self._feature_attn, pixel_values)
        return EncodedImages(features, scores, lambda i: self.multi_modal_projector(features[i]))

    def _merge_kept(self, encoded: EncodedImages, picks) -> list[torch.Tensor]:
        kept = [f if p is None else f.index_select(0, p)
                for f, p in zip(encoded.units, picks, strict=True)]
        return list(torch.split(self.multi_modal_projector(torch.cat(kept)),
                                [f.shape[0] for f in kept]))

    def _pruned_lora_token_counts(
        self, mm_kwargs: MultiModalKwargsItem, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        return self._num_patches(), num_mm_embeds
