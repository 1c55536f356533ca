"""LLaVA-1.5 with ID-Selection: K placeholders per image, K embeddings chosen from the image's own.

Mirrors vLLM's `model_executor/models/llava.py` split: ProcessingInfo (counts, budget), the
MultiModalProcessor (prompt updates, fields), and the model (embedding step). Only CLIP towers
with the "default" feature strategy (LLaVA-1.5 checkpoints) are pruned; other LLaVA-architecture
checkpoints (Pixtral-HF, SigLIP towers) keep vLLM's stock behaviour and refuse a budget.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature, CLIPVisionConfig
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
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
from vllm.multimodal.inputs import (
    MultiModalFieldConfig,
    MultiModalKwargsItem,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    InputProcessingContext,
    PromptReplacement,
    PromptUpdate,
)
from vllm.multimodal.processing.inputs import ProcessorInputs

from idselect.budget import BUDGET_KEY, BudgetError, budget_bucket, kept_tokens, validate_budget
from idselect.importance import cls_attention
from idselect.selection import id_select_batched
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.capture import capture_cls_qk
from idselect.vllm_plugin.settings import PluginSettings

logger = init_logger("vllm.idselect.plugin")  # under "vllm": vLLM's log handlers

# Per-image kept count carried from the processor to the embedding step, cached with the item.
# 0 means "no pruning" so every image carries the field and items still batch together.
KEEP_FIELD = "idselect_num_kept"

# Dummy inputs for memory profiling go through `apply` too; they are not traffic.
_profiling = contextvars.ContextVar("idselect_profiling", default=False)


def supports_pruning(hf_config) -> bool:
    """ID-Selection needs [CLS] attention: a CLIP tower whose [CLS] is dropped from the features."""
    return (
        isinstance(hf_config.vision_config, CLIPVisionConfig)
        and hf_config.vision_feature_select_strategy == "default"
        and isinstance(hf_config.vision_feature_layer, int)
    )


class IDSelectLlavaProcessingInfo(LlavaProcessingInfo):
    def get_settings(self) -> PluginSettings:
        return PluginSettings.from_hf_config(self.get_hf_config())

    def resolve_budget(self, hf_processor_mm_kwargs: Mapping[str, object]) -> int | None:
        """The request's budget if it gave one (null counts as not given), else the default."""
        requested = validate_budget(hf_processor_mm_kwargs.get(BUDGET_KEY))
        return requested if requested is not None else self.get_settings().default_budget

    def get_full_image_tokens(self) -> int:
        size = self.get_image_size_with_most_features()
        return self.get_num_image_tokens(image_width=size.width, image_height=size.height)


class IDSelectLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    info: IDSelectLlavaProcessingInfo

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        # Keep the budget away from transformers: it would warn, and vLLM would build and cache
        # one HF processor per distinct budget value.
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k != BUDGET_KEY}
        return super()._call_hf_processor(hf_data, hf_kwargs)

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data = super()._postprocess_hf_mm_data(
            mm_inputs, hf_processor_mm_kwargs, processed_data
        )
        budget = self.info.resolve_budget(hf_processor_mm_kwargs)
        pixel_values = processed_data.get("pixel_values")
        if pixel_values is not None:
            full = self.info.get_full_image_tokens()
            keep = 0 if budget is None or budget >= full else budget
            processed_data[KEEP_FIELD] = torch.full((len(pixel_values),), keep, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            KEEP_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        images = mm_items.get("image")
        if images is not None and not isinstance(images, ImageProcessorItems):
            if hf_processor_mm_kwargs.get(BUDGET_KEY) is not None:
                raise BudgetError(f"{BUDGET_KEY} cannot be applied to precomputed image embeddings")
            return updates  # precomputed embeddings keep their own length
        if images is None:
            return updates  # every image came from the processor cache: nothing to resolve

        (update,) = updates
        stock_replacement = update.replacement

        def replacement(item_idx: int) -> list[int]:
            full_tokens = stock_replacement(item_idx)
            keep = _item_keep(out_mm_kwargs["image"][item_idx])
            return full_tokens[:keep] if keep else full_tokens

        return [PromptReplacement(modality="image", target=update.target, replacement=replacement)]

    def apply(self, inputs: ProcessorInputs, timing_ctx) -> object:
        # Validate up front: with every image served from the processor cache, the per-item
        # hooks below never see the request's kwargs.
        self.info.resolve_budget(inputs.hf_processor_mm_kwargs)
        result = super().apply(inputs, timing_ctx)
        if not _profiling.get():
            self._record(inputs, result)
        return result

    def get_dummy_mm_inputs(self, *args, **kwargs):
        token = _profiling.set(True)
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _profiling.reset(token)

    def _record(self, inputs: ProcessorInputs, result: Mapping[str, object]) -> None:
        # Counted from the placeholders, which exist for every request: the processed items
        # themselves may be elided when the engine core already caches them.
        if not isinstance(inputs.mm_data_items.get("image"), ImageProcessorItems):
            return
        full = self.info.get_full_image_tokens()
        bucket = budget_bucket(self.info.resolve_budget(inputs.hf_processor_mm_kwargs), full)
        for placeholder in result["mm_placeholders"].get("image", []):
            metrics.record_image(bucket, full, placeholder.get_num_embeds())


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


def _item_keep(item: MultiModalKwargsItem | Mapping[str, object]) -> int:
    return int(item[KEEP_FIELD].data)


@MULTIMODAL_REGISTRY.register_processor(
    _build_processor, info=_build_info, dummy_inputs=LlavaDummyInputsBuilder
)
class IDSelectLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA whose image-embedding step keeps K tokens per image, chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and BUDGET_KEY in (mm_config.mm_processor_kwargs or {}):
            raise ValueError(
                f"set the default {BUDGET_KEY} with `idselect serve --visual-token-budget N` "
                f"(or hf_overrides={{'{BUDGET_KEY}': N}}), not --mm-processor-kwargs, which would "
                "hand it to the Hugging Face processor"
            )
        self.idselect_settings = PluginSettings.from_hf_config(self.config)
        self._prunes = supports_pruning(self.config)
        if self._prunes:
            feature_layer = self.vision_tower.vision_model.encoder.layers[-1]
            self._feature_attn = feature_layer.self_attn
        logger.info(
            "idselect: ID-Selection %s (default budget: %s, gamma=%s, suppression=%s)",
            "active" if self._prunes else "unavailable for this vision tower",
            self.idselect_settings.default_budget or "full",
            self.idselect_settings.gamma,
            self.idselect_settings.suppression,
        )

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_FIELD, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if keep is None or image_input["type"] != "pixel_values" or not self._prunes:
            return self._process_image_input(image_input)
        keeps = [int(k) for k in torch.as_tensor(keep).flatten().tolist()]
        return self._embed_selected(image_input["pixel_values"], keeps)

    def _embed_selected(self, pixel_values: torch.Tensor, keeps: list[int]) -> tuple[torch.Tensor]:
        if len(keeps) != len(pixel_values):
            raise RuntimeError(f"{len(keeps)} budgets for {len(pixel_values)} images")
        micro = self.idselect_settings.encoder_micro_batch
        kept_features: list[torch.Tensor] = []
        for start in range(0, len(pixel_values), micro):
            batch = pixel_values[start : start + micro]
            kept_features.extend(self._select_batch(batch, keeps[start : start + micro]))

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

    def _select_batch(self, pixel_values: torch.Tensor, keeps: list[int]) -> list[torch.Tensor]:
        attn = self._feature_attn.attn
        with capture_cls_qk(attn) as captured:
            features = self._image_pixels_to_features(self.vision_tower, pixel_values)
        if all(k == 0 for k in keeps):
            return list(features)

        started = time.perf_counter()
        cls_query, keys = captured.single()
        # Sum over this rank's heads; with tensor parallelism the heads are sharded, so the
        # partial sums are all-reduced before anyone selects, or ranks would disagree.
        scores = cls_attention(cls_query, keys, attn.num_heads, attn.scale, reduce="sum")
        if get_tensor_model_parallel_world_size() > 1 and self._feature_attn.tp_size > 1:
            scores = tensor_model_parallel_all_reduce(scores)
        n = features.shape[1]
        picks = id_select_batched(
            features,
            scores,
            [k if k else n for k in keeps],
            gamma=self.idselect_settings.gamma,
            suppression=self.idselect_settings.suppression,
        )
        if features.is_cuda:
            torch.cuda.synchronize(features.device)
        per_image = (time.perf_counter() - started) / len(keeps)
        for _ in keeps:
            metrics.observe_selection(per_image)
        return [f.index_select(0, idx.to(f.device)) for f, idx in zip(features, picks, strict=True)]

    def get_mm_lora_token_counts(
        self,
        *,
        modality: str,
        mm_kwargs: MultiModalKwargsItem | None,
        num_mm_embeds: int,
    ) -> tuple[int, int | None]:
        # The tower still sees every patch; only the connector and the LLM see K.
        if mm_kwargs is not None and KEEP_FIELD in mm_kwargs and _item_keep(mm_kwargs):
            return self._num_patches(), num_mm_embeds
        return num_mm_embeds, num_mm_embeds
