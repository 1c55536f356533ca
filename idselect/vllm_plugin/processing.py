"""Budget handling shared by the plugin's multimodal processors (front-end process).

The request's budget becomes a per-image field that is cached with the processed item and reaches
the embedding step, and it decides how many image placeholders the prompt gets, before the
encoder runs. Model-specific counting stays in each architecture's ProcessingInfo.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Mapping, Sequence

import torch
from transformers import BatchFeature
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs

from idselect.budget import BUDGET_KEY, BudgetError, budget_bucket, validate_budget
from idselect.importance_source import (
    IMPORTANCE_KEY,
    IMPORTANCE_SOURCES,
    ImportanceError,
    ImportanceSource,
    validate_importance,
)
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.settings import PluginSettings

# Per-image budget carried from the processor to the embedding step, cached with the item.
# 0 means "no pruning" (no budget, or one at least the image's full count), so every image
# carries the field and items still batch together.
KEEP_FIELD = "idselect_num_kept"
# Importance source per image (index into IMPORTANCE_SOURCES) and, for the prompt-aware ones,
# the prompt's text token ids (padded with -1): the embedding step has no prompt of its own.
IMPORTANCE_FIELD = "idselect_importance"
TEXT_FIELD = "idselect_text_ids"
MAX_TEXT_TOKENS = 256
# Internal processor kwarg that carries the prompt's text ids to the per-item hooks. Being a
# processor kwarg, it is part of the item's cache hash: prompt-aware embeddings of the same image
# under a different prompt are never served from the encoder or prefix cache.
_TEXT_IDS_KWARG = "_idselect_text_ids"
_OUR_KWARGS = (BUDGET_KEY, IMPORTANCE_KEY, _TEXT_IDS_KWARG)

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

    def resolve_importance(self, hf_processor_mm_kwargs: Mapping[str, object]) -> ImportanceSource:
        requested = validate_importance(hf_processor_mm_kwargs.get(IMPORTANCE_KEY))
        return requested or self.get_settings().default_importance

    def supports_prompt_importance(self) -> bool:
        return False

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
        hf_kwargs = {k: v for k, v in hf_kwargs.items() if k not in _OUR_KWARGS}
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
            source = self.info.resolve_importance(hf_processor_mm_kwargs)
            text = torch.full((len(keeps), MAX_TEXT_TOKENS), -1, dtype=torch.long)
            ids = list(hf_processor_mm_kwargs.get(_TEXT_IDS_KWARG) or ())[-MAX_TEXT_TOKENS:]
            if ids:
                text[:, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            code = IMPORTANCE_SOURCES.index(source)
            processed_data[IMPORTANCE_FIELD] = torch.full((len(keeps),), code, dtype=torch.long)
            processed_data[TEXT_FIELD] = text
        return processed_data

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            KEEP_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            IMPORTANCE_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
            TEXT_FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
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
        source = self.info.resolve_importance(inputs.hf_processor_mm_kwargs)
        if source != "cls":
            inputs = self._with_prompt_text(inputs)
        result = super().apply(inputs, timing_ctx)
        if not _profiling.get():
            self._record(inputs, result, budget)
        return result

    def _with_prompt_text(self, inputs: ProcessorInputs) -> ProcessorInputs:
        if not self.info.supports_prompt_importance():
            raise ImportanceError(
                f"{IMPORTANCE_KEY} 'text' and 'unified' are not supported for this model yet"
            )
        prompt = inputs.prompt
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt)
        image_token = self.info.get_hf_config().image_token_index
        text_ids = tuple(t for t in prompt if t != image_token)
        kwargs = {**inputs.hf_processor_mm_kwargs, _TEXT_IDS_KWARG: text_ids}
        return dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)

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
