"""Budget handling shared by the plugin's multimodal processors (front-end process).

The request's budget becomes a per-image field that is cached with the processed item and reaches
the embedding step, and it decides how many image placeholders the prompt gets, before the
encoder runs. Model-specific counting stays in each architecture's ProcessingInfo.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs

from idselect.budget import BUDGET_KEY, BudgetError, budget_bucket, validate_budget
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.settings import PluginSettings

# Per-image budget carried from the processor to the embedding step, cached with the item.
# 0 means "no pruning" (no budget, or one at least the image's full count), so every image
# carries the field and items still batch together.
KEEP_FIELD = "idselect_num_kept"

# Dummy inputs for memory profiling go through `apply` too; they are not traffic.
_profiling = contextvars.ContextVar("idselect_profiling", default=False)


def item_budget(item: Mapping[str, object]) -> int:
    return int(item[KEEP_FIELD].data)


class BudgetInfoMixin:
    """For a vLLM ProcessingInfo: where the budget comes from and what it keeps."""

    def get_settings(self) -> PluginSettings:
        return PluginSettings.from_hf_config(self.get_hf_config())

    def resolve_budget(self, hf_processor_mm_kwargs: Mapping[str, object]) -> int | None:
        """The request's budget if it gave one (null counts as not given), else the default."""
        requested = validate_budget(hf_processor_mm_kwargs.get(BUDGET_KEY))
        return requested if requested is not None else self.get_settings().default_budget

    def full_tokens(self, width: int, height: int) -> int:
        """Image tokens vLLM's stock model gives this image."""
        return self.get_num_image_tokens(image_width=width, image_height=height)

    def kept_tokens(self, budget: int, width: int, height: int) -> int:
        """Placeholders for an image under a budget smaller than its full count."""
        return budget

    def full_tokens_per_item(self, processed: BatchFeature) -> list[int]:
        raise NotImplementedError


class BudgetProcessorMixin:
    """Put before a vLLM multimodal processor class in the bases."""

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
        if processed_data.get("pixel_values") is not None:
            budget = self.info.resolve_budget(hf_processor_mm_kwargs)
            fulls = self.info.full_tokens_per_item(processed_data)
            keeps = [0 if budget is None or budget >= full else budget for full in fulls]
            processed_data[KEEP_FIELD] = torch.tensor(keeps, dtype=torch.long)
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
            budget = item_budget(out_mm_kwargs["image"][item_idx])
            if not budget:
                return full_tokens
            size = images.get_image_size(item_idx)
            return full_tokens[: self.info.kept_tokens(budget, size.width, size.height)]

        return [PromptReplacement(modality="image", target=update.target, replacement=replacement)]

    def apply(self, inputs: ProcessorInputs, timing_ctx) -> object:
        # Validate up front: with every image served from the processor cache, the per-item
        # hooks never see the request's kwargs.
        budget = self.info.resolve_budget(inputs.hf_processor_mm_kwargs)
        result = super().apply(inputs, timing_ctx)
        if not _profiling.get():
            self._record(inputs, result, budget)
        return result

    def get_dummy_mm_inputs(self, *args, **kwargs):
        token = _profiling.set(True)
        try:
            return super().get_dummy_mm_inputs(*args, **kwargs)
        finally:
            _profiling.reset(token)

    def _record(self, inputs: ProcessorInputs, result: Mapping, budget: int | None) -> None:
        # Counted from the placeholders, which exist for every request: the processed items
        # themselves may be elided when the engine core already caches them.
        images = inputs.mm_data_items.get("image")
        if not isinstance(images, ImageProcessorItems):
            return
        placeholders = result["mm_placeholders"].get("image", [])
        for idx, placeholder in enumerate(placeholders):
            size = images.get_image_size(idx)
            full = self.info.full_tokens(size.width, size.height)
            metrics.record_image(budget_bucket(budget, full), full, placeholder.get_num_embeds())
