"""The model half of the backbone framework: the embedding step's shared selection machinery.

Put `SelectionModelMixin` before a vLLM model class. An architecture's `embed_multimodal` runs its
tower (capturing its own importance), then hands each image's selection units to `_pick`: every
image's score (its visual score, or the prompt-aware one it asked for), ID-Selection over the
batch, timed on the selection histogram. What it does with the kept units (project, merge,
position) stays in the architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.multimodal.inputs import MultiModalKwargsItem

from idselect.baselines import get_selector
from idselect.selection import id_select_batched
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.compat import ChecksVLLMOverrides, overrides_vllm
from idselect.vllm_plugin.items import ImagePlans, item_keep
from idselect.vllm_plugin.settings import PluginSettings

logger = init_logger("vllm.idselect.plugin")  # under "vllm": vLLM's log handlers


class SelectionModelMixin(ChecksVLLMOverrides):
    def _init_selection(
        self, vllm_config: VllmConfig, what: str, *, has_cls_token: bool = True
    ) -> None:
        # Refuses defaults given through --mm-processor-kwargs (they would reach transformers).
        self.idselect_settings = PluginSettings.for_model(vllm_config)
        if self.idselect_settings.defaults.importance == "cls" and not has_cls_token:
            raise ValueError(
                "the default visual_token_importance 'cls' needs a vision tower with a [CLS] "
                f"token, and this model's has none ({what}): use 'visual' (its own visual "
                "saliency score)"
            )
        logger.info("idselect: ID-Selection active for %s (%s)", what,
                    self.idselect_settings.describe())

    def _image_input_with_plans(
        self, kwargs: dict[str, object]
    ) -> tuple[object, ImagePlans | None]:
        """vLLM's parsed image input, and the plans when it holds pixels to prune (None: serve
        the images as vLLM does). For models with one image input (LLaVA family)."""
        plans = ImagePlans.pop(kwargs)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None or image_input["type"] != "pixel_values":
            return image_input, None
        return image_input, plans if plans is not None and plans.any_pruned() else None

    def _micro_batches(self, n: int) -> Iterator[slice]:
        """Images per tower pass: the scheduler charges only the kept placeholders against the
        encoder budget, so one encoder batch can hold far more images than profiling assumed."""
        micro = self.idselect_settings.encoder_micro_batch
        for start in range(0, n, micro):
            yield slice(start, min(start + micro, n))

    def _pick(
        self,
        units: Sequence[torch.Tensor],
        visual_scores: Sequence[torch.Tensor],
        plans: ImagePlans,
        llm_tokens: Callable[[int], torch.Tensor],
    ) -> list[torch.Tensor | None]:
        """Kept unit indices (ascending) per image; None for the images served unpruned.

        `units[i]`: image i's selection units (N_i, D), the features similarity is measured on;
        `visual_scores[i]`: their visual importance (N_i,); `llm_tokens(i)`: the same units in
        the language model's embedding space, asked for only by prompt-aware images. Each image
        is selected by the selector it asked for; ID-Selection runs batched.
        """
        picks: list[torch.Tensor | None] = [None] * len(plans)
        embed = self.get_language_model().embed_input_ids
        for selector in dict.fromkeys(plans.selectors):
            chosen = [i for i, (k, s) in enumerate(zip(plans.keeps, plans.selectors, strict=True))
                      if k is not None and s == selector]
            if not chosen:
                continue
            with metrics.timed_selection(units[chosen[0]].device, len(chosen), selector):
                scores = [
                    plans.score(i, visual_scores[i], partial(llm_tokens, i), embed)
                    for i in chosen
                ]
                kept = self._select(selector, [units[i] for i in chosen], scores,
                                    [plans.keeps[i] for i in chosen],
                                    [plans.seeds[i] for i in chosen])
            for i, idx in zip(chosen, kept, strict=True):
                picks[i] = idx.to(units[i].device)
        return picks

    def _select(self, selector: str, units, scores, keeps, seeds) -> list[torch.Tensor]:
        settings = self.idselect_settings
        if selector == "id_select":
            return id_select_batched(units, scores, keeps, gamma=settings.gamma,
                                     suppression=settings.suppression, backend="auto")
        # The baselines (A/B runs): one image at a time; `random` draws from the image's seed.
        return [
            get_selector(selector, **({"seed": seed} if selector == "random" else {}))(u, s, k)
            for u, s, k, seed in zip(units, scores, keeps, seeds, strict=True)
        ]

    @overrides_vllm
    def get_mm_lora_token_counts(
        self,
        *,
        modality: str,
        mm_kwargs: MultiModalKwargsItem | None,
        num_mm_embeds: int,
    ) -> tuple[int, int | None]:
        if modality == "image" and mm_kwargs is not None and item_keep(mm_kwargs) is not None:
            return self._pruned_lora_token_counts(mm_kwargs, num_mm_embeds)
        return super().get_mm_lora_token_counts(
            modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds
        )

    def _pruned_lora_token_counts(
        self, mm_kwargs: MultiModalKwargsItem, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        """(tokens the tower saw, tokens the connector saw) for a pruned image, for LoRA on the
        tower and connector: the tower still sees every patch."""
        raise NotImplementedError


def check_counts(embeddings: Sequence[torch.Tensor], expected: Sequence[int]) -> None:
    """vLLM fails on too few rows per item and silently truncates too many: check here."""
    got = [e.shape[0] for e in embeddings]
    if got != list(expected):
        raise RuntimeError(f"idselect produced {got} embeddings per image, expected {expected}")
