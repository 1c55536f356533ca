"""The front-end half of the backbone framework: ProcessingInfo and processor mixins.

Put `SelectionInfoMixin` before a vLLM ProcessingInfo class and `SelectionProcessorMixin` before
its multimodal processor. Per request they:

1. take the request's options (`VisualOptions`): as the HTTP layer validated them
   (`usage.current()`), or, where the processor is where they enter (offline `vllm.LLM`, vLLM's
   other endpoints), parsed from the request's `mm_processor_kwargs`; fill in the deployment
   defaults (`PluginSettings`, read once per processor), refuse what this backbone cannot do
   (`OptionRefused`: vLLM's 400 with its `param`), and keep our keys away from transformers;
2. give each image its kept count from the model's own counts (`ItemTokens`): `min(K,
   selectable)` when the budget is below the image's full count, else unpruned; a fixed function of
   the image and K, known before the encoder runs;
3. carry the plan to the model as per-image fields (`items`), part of the item's cache hash,
   with the prompt's text ids when the importance is prompt-aware;
4. emit that many placeholders per image (every image prompt update of the model);
5. report each image's original and kept counts (`usage`), profiling excluded.

An architecture states only its counts: `item_tokens` (from the processed outputs) and
`full_tokens` (from an image size, for images the processor cache elided), and where its
placeholders differ from a run of one token, `pruned_replacement`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from transformers import BatchFeature
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs

from idselect.budget import budget_bucket, kept_count
from idselect.options import (
    BUDGET_KEY,
    OPTION_KEYS,
    BudgetError,
    ImportanceError,
    OptionError,
    VisualOptions,
)
from idselect.vllm_plugin import items, usage
from idselect.vllm_plugin.compat import ChecksVLLMOverrides, overrides_vllm
from idselect.vllm_plugin.settings import PluginSettings

# Internal processor kwarg with the prompt's text ids, for the prompt-aware sources: it only puts
# the prompt into each item's cache hash (the hooks read the ids from the request context).
_TEXT_IDS_KWARG = "_idselect_text_ids"
_OUR_KWARGS = (*OPTION_KEYS, _TEXT_IDS_KWARG)


@dataclass(frozen=True)
class ItemTokens:
    full: int  # tokens vLLM's stock model gives the image
    selectable: int  # of those, the ones ID-Selection chooses from (the rest are structure)


@dataclass(frozen=True)
class _Request:
    options: VisualOptions  # resolved
    text_ids: tuple[int, ...]  # the prompt without media tokens (prompt-aware sources only)


# The request being processed, for the per-item hooks `apply` calls (same thread); None while
# vLLM profiles with dummy inputs, which are not traffic and are never pruned.
_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "idselect_request", default=None
)


class OptionRefused(VLLMValidationError):
    """An idselect option the processor refused: vLLM answers it with HTTP 400 whose `param` is
    this error's `parameter`; offline callers get it from `LLM.generate`."""

    def __init__(self, error: OptionError) -> None:
        super().__init__(str(error), parameter=error.param)

    def __str__(self) -> str:  # vLLM's appends "(parameter=...)": it travels as data here
        return str(self.args[0])


# The images the current HF processor call handles, in order (around `_apply_hf_processor_main`).
_processed_images: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "idselect_processed_images", default=()
)


def _image_seeds(images: tuple, n: int, selector: str) -> list[int]:
    """Per image, a seed from its pixels (the `random` selector's: the same image draws the same
    tokens, on any machine); 0 for the other selectors, which need none."""
    if selector != "random":
        return [0] * n
    if len(images) != n:
        raise RuntimeError(f"{len(images)} images for {n} processed items")
    seeds = []
    for image in images:
        digest = hashlib.blake2b(np.asarray(image).tobytes(), digest_size=8).digest()
        seeds.append(int.from_bytes(digest, "little") >> 1)  # fits int64
    return seeds


def without_our_kwargs(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k not in _OUR_KWARGS}


class SelectionInfoMixin(ChecksVLLMOverrides):
    """For a vLLM ProcessingInfo: settings, options and the counts of this architecture."""

    # The backbone's visual score is [CLS] attention: the request name "cls" is accepted.
    has_cls_token = True

    @cached_property
    def settings(self) -> PluginSettings:
        """The deployment's settings, read from the model's config once per processor."""
        return PluginSettings.from_hf_config(self.get_hf_config())

    def resolve(self, requested: VisualOptions) -> VisualOptions:
        """A request's (valid) options with the deployment defaults filled in, under the
        deployment's maximum budget; refuses what this backbone or deployment cannot do."""
        if requested.importance == "cls" and not self.has_cls_token:
            raise ImportanceError(
                "visual_token_importance 'cls' needs a vision tower with a [CLS] token, and "
                "this model's has none: use 'visual' (its own visual saliency score)"
            )
        cap = self.settings.max_budget
        if cap is not None and requested.budget is not None and requested.budget > cap:
            raise BudgetError(
                f"{BUDGET_KEY} {requested.budget} is above this server's maximum of {cap} "
                "visual tokens per image (--max-visual-token-budget)"
            )
        options = requested.resolved(self.settings.defaults)
        if cap is not None and options.budget is None:
            return dataclasses.replace(options, budget=cap)
        return options

    @overrides_vllm
    def get_mm_max_tokens_per_item(
        self, seq_len: int, mm_counts: Mapping[str, int]
    ) -> Mapping[str, int] | None:
        """vLLM's reservation per image (encoder budget, profiling) follows the maximum budget.
        When vLLM has no count to give, it processes dummy inputs, which are pruned to the
        maximum too (`SelectionProcessorMixin.apply`)."""
        stock = super().get_mm_max_tokens_per_item(seq_len, mm_counts)
        cap = self.settings.max_budget
        if stock is None or cap is None or "image" not in stock:
            return stock
        return {**stock, "image": min(stock["image"], cap)}

    @overrides_vllm
    def get_hf_processor(self, **kwargs: object):
        # Never hand our options to transformers: it would warn, and vLLM would build and cache
        # one HF processor per distinct value.
        return super().get_hf_processor(**without_our_kwargs(kwargs))

    def item_tokens(self, processed: BatchFeature) -> list[ItemTokens]:
        """Counts of each image the HF processor produced pixels for."""
        raise NotImplementedError

    def full_tokens(self, width: int, height: int, mm_kwargs: Mapping[str, object]) -> int:
        """Tokens vLLM's stock model gives an image of this size."""
        return self.get_num_image_tokens(image_width=width, image_height=height)


class SelectionProcessorMixin(ChecksVLLMOverrides):
    """Put before a vLLM multimodal processor class in the bases."""

    @overrides_vllm
    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
        return super()._call_hf_processor(hf_data, without_our_kwargs(hf_kwargs))

    @overrides_vllm
    def _apply_hf_processor_main(self, mm_items: MultiModalDataItems, hf_kwargs):
        # The images this HF call processes (only the processor-cache misses), for their seeds.
        images = mm_items.get("image")
        pixels = (tuple(images.get(i) for i in range(len(images)))
                  if isinstance(images, ImageProcessorItems) else ())
        token = _processed_images.set(pixels)
        try:
            return super()._apply_hf_processor_main(mm_items, hf_kwargs)
        finally:
            _processed_images.reset(token)

    @overrides_vllm
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
            request = _request.get()
            budget = request.options.budget if request is not None else None
            keeps = [kept_count(budget, t.full, t.selectable)
                     for t in self.info.item_tokens(processed_data)]
            options = request.options if request is not None else VisualOptions().resolved(
                VisualOptions())
            text_ids = request.text_ids if request is not None else ()
            seeds = _image_seeds(_processed_images.get(), len(keeps), options.selector)
            processed_data.update(
                items.encode(keeps, options.source, text_ids, options.selector, seeds)
            )
        return processed_data

    @overrides_vllm
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            **items.fields_config(),
        }

    @overrides_vllm
    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        images = mm_items.get("image")
        if images is not None and not isinstance(images, ImageProcessorItems):
            return updates  # precomputed embeddings keep their own length
        return [self._pruned_update(u, out_mm_kwargs) for u in updates]

    def _pruned_update(
        self, update: PromptUpdate, out_mm_kwargs: MultiModalKwargsItems
    ) -> PromptUpdate:
        if update.modality != "image":
            return update
        stock = update.replacement

        def replacement(item_idx: int):
            full = stock(item_idx)
            keep = items.item_keep(out_mm_kwargs["image"][item_idx])
            return full if keep is None else self.pruned_replacement(full, keep)

        return PromptReplacement(modality="image", target=update.target, replacement=replacement)

    def pruned_replacement(self, stock: object, keep: int) -> object:
        """The placeholders of an image that keeps `keep` tokens, from the stock ones."""
        return stock[:keep]

    @overrides_vllm
    def apply(self, inputs: ProcessorInputs, timing_ctx) -> object:
        if _profiling.get():
            # Dummy inputs (vLLM's memory profile, its count of tokens per image): the largest
            # image as the deployment serves it, unpruned unless a maximum budget is set.
            cap = self.info.settings.max_budget
            if cap is None:
                return super().apply(inputs, timing_ctx)
            largest = VisualOptions(budget=cap).resolved(VisualOptions())  # visual, id_select
            token = _request.set(_Request(largest, ()))
            try:
                return super().apply(inputs, timing_ctx)
            finally:
                _request.reset(token)
        # The per-item hooks below may not run at all (every image served from the processor
        # cache): resolve the options here, once per request.
        kwargs = inputs.hf_processor_mm_kwargs
        scope = usage.current()
        images = inputs.mm_data_items.get("image")
        try:
            requested = scope.options if scope is not None else VisualOptions.parse(kwargs)
            options = self.info.resolve(requested)
            if (requested.budget is not None and images is not None
                    and not isinstance(images, ImageProcessorItems)):
                raise BudgetError(
                    f"{BUDGET_KEY} cannot be applied to precomputed image embeddings")
        except OptionError as exc:
            raise OptionRefused(exc) from None
        text_ids: tuple[int, ...] = ()
        if options.source != "visual":
            text_ids = self._prompt_text_ids(inputs)
            # As a processor kwarg it is part of each item's cache hash: prompt-aware embeddings
            # of an image under another prompt are never served from any cache.
            kwargs = {**kwargs, _TEXT_IDS_KWARG: text_ids}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs=kwargs)
        token = _request.set(_Request(options, text_ids))
        try:
            result = super().apply(inputs, timing_ctx)
        finally:
            _request.reset(token)
        usage.report(self._image_usage(inputs, result, options), options)
        return result

    def _prompt_text_ids(self, inputs: ProcessorInputs) -> tuple[int, ...]:
        prompt = inputs.prompt
        if isinstance(prompt, str):
            prompt = self.info.get_tokenizer().encode(prompt)
        placeholders = set(self.placeholder_token_ids())
        return tuple(t for t in prompt if t not in placeholders)

    def placeholder_token_ids(self) -> Sequence[int]:
        """Token ids that stand for media in a prompt (left out of the prompt-aware text)."""
        return (self.info.get_hf_config().image_token_index,)

    @overrides_vllm
    def get_dummy_mm_inputs(self, *args, **kwargs):
        # Profiling inputs are processed through `apply` too: mark them as not traffic.
        return _profiling_call(super().get_dummy_mm_inputs, *args, **kwargs)

    def _image_usage(
        self, inputs: ProcessorInputs, result: Mapping, options: VisualOptions
    ) -> list[usage.ImageUsage]:
        # From the placeholders, which exist for every request: the processed items themselves
        # may be elided when the engine core already caches them.
        placeholders = result["mm_placeholders"].get("image", [])
        images = inputs.mm_data_items.get("image")
        out = []
        for idx, placeholder in enumerate(placeholders):
            kept = placeholder.get_num_embeds()
            if isinstance(images, ImageProcessorItems):
                size = images.get_image_size(idx)
                full = self.info.full_tokens(
                    size.width, size.height, without_our_kwargs(inputs.hf_processor_mm_kwargs)
                )
            else:  # precomputed embeddings: served as given
                full = kept
            bucket = budget_bucket(options.budget, full) if kept < full else "full"
            out.append(usage.ImageUsage(full, kept, bucket))
        return out


class UnprunedProcessorMixin(ChecksVLLMOverrides):
    """For a model variant ID-Selection cannot prune (no usable importance in its tower): served
    as vLLM serves it, its usage reported, and a request's options refused, never ignored."""

    @overrides_vllm
    def apply(self, inputs: ProcessorInputs, timing_ctx) -> object:
        scope = usage.current()
        try:
            requested = (scope.options if scope is not None
                         else VisualOptions.parse(inputs.hf_processor_mm_kwargs))
        except OptionError as exc:
            raise OptionRefused(exc) from None
        for key in requested.as_kwargs():
            raise OptionRefused(OptionError(
                f"{key} cannot be applied: this model's vision tower is served unpruned by "
                "idselect (it has no importance score ID-Selection can use)",
                key,
            ))
        result = super().apply(inputs, timing_ctx)
        if not _profiling.get():
            placeholders = result["mm_placeholders"].get("image", [])
            n = [p.get_num_embeds() for p in placeholders]
            usage.report([usage.ImageUsage(k, k, "full") for k in n])
        return result

    @overrides_vllm
    def get_dummy_mm_inputs(self, *args, **kwargs):
        return _profiling_call(super().get_dummy_mm_inputs, *args, **kwargs)


_profiling: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "idselect_profiling", default=False
)


def _profiling_call(fn, *args, **kwargs):
    token = _profiling.set(True)
    try:
        return fn(*args, **kwargs)
    finally:
        _profiling.reset(token)
