"""LLaVA-1.5 with ID-Selection: K placeholders per image, K embeddings chosen from the image's own.

Mirrors vLLM's `model_executor/models/llava.py` split: ProcessingInfo (counts, budget), the
MultiModalProcessor (prompt updates, fields), and the model (embedding step). Only CLIP towers
with the "default" feature strategy (LLaVA-1.5 checkpoints) are pruned; other LLaVA-architecture
checkpoints (Pixtral-HF, SigLIP towers) keep vLLM's stock behaviour and refuse a budget.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import torch
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.logger import init_logger
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

from idselect.budget import BUDGET_KEY, BudgetError, kept_tokens
from idselect.selection import id_select_batched
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.capture import encode_with_cls_scores
from idselect.vllm_plugin.processing import (
    IMPORTANCE_FIELD,
    KEEP_FIELD,
    TEXT_FIELD,
    BudgetInfoMixin,
    BudgetProcessorMixin,
    item_budget,
)
from idselect.vllm_plugin.prompt_importance import ImagePrompts
from idselect.vllm_plugin.settings import PluginSettings

logger = init_logger("vllm.idselect.plugin")  # under "vllm": vLLM's log handlers


def supports_pruning(hf_config) -> bool:
    """ID-Selection needs [CLS] attention: a CLIP tower whose [CLS] is dropped from the features."""
    return (
        isinstance(hf_config.vision_config, CLIPVisionConfig)
        and hf_config.vision_feature_select_strategy == "default"
        and isinstance(hf_config.vision_feature_layer, int)
    )


class IDSelectLlavaProcessingInfo(BudgetInfoMixin, LlavaProcessingInfo):
    def supports_prompt_importance(self) -> bool:
        return True

    def full_tokens_per_item(self, processed: BatchFeature) -> list[int]:
        # Every image is resized to the tower's input: the count does not depend on its size.
        size = self.get_image_size_with_most_features()
        return [self.full_tokens(size.width, size.height)] * len(processed["pixel_values"])


class IDSelectLlavaMultiModalProcessor(BudgetProcessorMixin, LlavaMultiModalProcessor):
    info: IDSelectLlavaProcessingInfo


class BudgetRejectingPixtralProcessor(PixtralHFMultiModalProcessor):
    """Pixtral-HF towers have no [CLS]: serve them unpruned, but never ignore a budget silently."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        if hf_kwargs.get(BUDGET_KEY) is not None:
            raise BudgetError(f"{BUDGET_KEY} is not supported for Pixtral vision towers")
        return super()._call_hf_processor(hf_data, hf_kwargs)


class BudgetRejectingLlavaProcessor(LlavaMultiModalProcessor):
    """LLaVA variants without a pruneable tower (SigLIP, "full" strategy): same contract."""

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        if hf_kwargs.get(BUDGET_KEY) is not None:
            raise BudgetError(f"{BUDGET_KEY} is not supported for this model's vision tower")
        return super()._call_hf_processor(hf_data, hf_kwargs)


def _build_info(ctx: InputProcessingContext):
    from transformers import LlavaConfig, PixtralVisionConfig

    hf_config = ctx.get_hf_config(LlavaConfig)
    if isinstance(hf_config.vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return IDSelectLlavaProcessingInfo(ctx)


def _build_processor(info, dummy_inputs: BaseDummyInputsBuilder) -> BaseMultiModalProcessor:
    if isinstance(info, PixtralHFProcessingInfo):
        return BudgetRejectingPixtralProcessor(info, dummy_inputs)
    if supports_pruning(info.get_hf_config()):
        return IDSelectLlavaMultiModalProcessor(info, dummy_inputs)
    return BudgetRejectingLlavaProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class IDSelectLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose image-embedding step keeps K tokens per image, chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.idselect_settings = PluginSettings.for_model(vllm_config)
        self._prunes = supports_pruning(self.config)
        if self._prunes:
            feature_layer = self.vision_tower.vision_model.encoder.layers[-1]
            self._feature_attn = feature_layer.self_attn
        logger.info(
            "idselect: ID-Selection %s (default budget: %s, importance=%s, gamma=%s, "
            "suppression=%s)",
            "active" if self._prunes else "unavailable for this vision tower",
            self.idselect_settings.default_budget or "full",
            self.idselect_settings.default_importance,
            self.idselect_settings.gamma,
            self.idselect_settings.suppression,
        )

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_FIELD, None)
        importance = kwargs.pop(IMPORTANCE_FIELD, None)
        text_ids = kwargs.pop(TEXT_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if keep is None or image_input["type"] != "pixel_values" or not self._prunes:
            return self._process_image_input(image_input)
        keeps = [int(k) for k in torch.as_tensor(keep).flatten().tolist()]
        prompts = ImagePrompts.from_fields(importance, text_ids, len(keeps))
        return self._embed_selected(image_input["pixel_values"], keeps, prompts)

    def _embed_selected(
        self, pixel_values: torch.Tensor, keeps: list[int], prompts: ImagePrompts
    ) -> tuple[torch.Tensor]:
        if len(keeps) != len(pixel_values):
            raise RuntimeError(f"{len(keeps)} budgets for {len(pixel_values)} images")
        micro = self.idselect_settings.encoder_micro_batch
        kept_features: list[torch.Tensor] = []
        for start in range(0, len(pixel_values), micro):
            batch = pixel_values[start : start + micro]
            part = slice(start, start + micro)
            kept_features.extend(self._select_batch(batch, keeps[part], prompts[part]))

        sizes = [f.shape[0] for f in kept_features]
        embeds = self.multi_modal_projector(torch.cat(kept_features))
        out = torch.split(embeds, sizes)
        expected = [kept_tokens(k or None, self._num_patches()) for k in keeps]
        if [e.shape[0] for e in out] != expected:
            # vLLM fails on too few rows and silently truncates too many: check here.
            raise RuntimeError(f"idselect produced {sizes} embeddings, expected {expected}")
        return out

    def _num_patches(self) -> int:
        vc = self.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def _select_batch(
        self, pixel_values: torch.Tensor, keeps: list[int], prompts: ImagePrompts
    ) -> list[torch.Tensor]:
        if all(k == 0 for k in keeps):
            return list(self._image_pixels_to_features(self.vision_tower, pixel_values))
        features, scores = encode_with_cls_scores(
            partial(self._image_pixels_to_features, self.vision_tower),
            self._feature_attn,
            pixel_values,
        )
        with metrics.timed_selection(features.device, sum(1 for k in keeps if k)):
            if prompts.any_prompt_aware():
                scores = prompts.rescore(
                    scores,
                    features,
                    self.multi_modal_projector,
                    self.language_model.embed_input_ids,
                )
            n = features.shape[1]
            picks = id_select_batched(
                features,
                scores,
                [k if k else n for k in keeps],
                gamma=self.idselect_settings.gamma,
                suppression=self.idselect_settings.suppression,
                backend="auto",
            )
        return [f.index_select(0, idx.to(f.device)) for f, idx in zip(features, picks, strict=True)]

    def get_mm_lora_token_counts(
        self,
        *,
        modality: str,
        mm_kwargs: MultiModalKwargsItem | None,
        num_mm_embeds: int,
    ) -> tuple[int, int | None]:
        # The tower still sees every patch; only the connector and the LLM see K.
        if mm_kwargs is not None and KEEP_FIELD in mm_kwargs and item_budget(mm_kwargs):
            return self._num_patches(), num_mm_embeds
        return num_mm_embeds, num_mm_embeds
