"""The model half of the backbone framework: the embedding step.

Put `SelectionModelMixin` before a vLLM model class. It owns `embed_multimodal`: it reads the
per-image plans the processor attached (`ImagePlans`), walks vLLM's parsed inputs in order,
serves what cannot or need not be pruned as vLLM does, and for images to prune runs micro-batches
of: the architecture's tower pass (capturing its importance), `_pick` (every image's score, its
visual one or the prompt-aware one it asked for, then its selector over the batch, timed on the
selection histogram), the architecture's merge of the kept units; then one count check.

An architecture states only its hooks:
- `_vision_inputs(kwargs)`: vLLM's parsed inputs, each with whether it is images given as pixels
  this backbone can prune;
- `_embed_as_vllm(input)`: the embeddings vLLM's own model gives that input;
- `_num_images(input)` and `_encode_images(input, part, plans)`: a micro-batch of images through
  the tower, as selection units, their visual scores and whatever the merge needs;
- `_merge_kept(encoded, picks)`: each image's embedding from its kept units (a pick of None: the
  image is served whole);
- `_pruned_lora_token_counts`: what the tower and connector saw, for LoRA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

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


@dataclass
class EncodedImages:
    """A micro-batch of images after the tower pass, as `_encode_images` returns it."""

    units: list[torch.Tensor]  # per image: the units similarity is measured on (N_i, D)
    scores: list[torch.Tensor] | None  # per image: visual importance (N_i,); None: none pruned
    # image i's units in the language model's embedding space (prompt-aware importance only)
    llm_tokens: Callable[[int], torch.Tensor]
    state: Any = None  # what the architecture's merge needs


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

    @overrides_vllm
    def embed_multimodal(self, **kwargs: object):
        plans = ImagePlans.pop(kwargs)
        out: list[torch.Tensor] = []
        for mm_input, prunable in self._vision_inputs(kwargs):
            if prunable and plans is not None and plans.any_pruned():
                out.extend(self._embed_selected(mm_input, plans))
            else:
                out.extend(self._embed_as_vllm(mm_input))
        return tuple(out)

    def _embed_selected(self, mm_input: Any, plans: ImagePlans) -> list[torch.Tensor]:
        n = self._num_images(mm_input)
        if len(plans) != n:
            raise RuntimeError(f"idselect: {len(plans)} selection plans for {n} images")
        out: list[torch.Tensor] = []
        for part in self._micro_batches(n):
            encoded = self._encode_images(mm_input, part, plans[part])
            picks = self._pick(encoded.units, encoded.scores, plans[part], encoded.llm_tokens)
            out.extend(self._merge_kept(encoded, picks))
        # vLLM fails on too few rows per item and silently truncates too many: check here.
        got = [(e.shape[0], k) for e, k in zip(out, plans.keeps, strict=True) if k is not None]
        if any(rows != keep for rows, keep in got):
            raise RuntimeError(f"idselect produced {[r for r, _ in got]} embeddings for "
                               f"images that keep {[k for _, k in got]}")
        return out

    # ---- the architecture's hooks

    def _vision_inputs(self, kwargs: dict[str, object]) -> Iterable[tuple[Any, bool]]:
        """vLLM's parsed multimodal inputs, in prompt order, each with whether it is images
        given as pixels that this model can prune."""
        raise NotImplementedError

    def _embed_as_vllm(self, mm_input: Any) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def _num_images(self, mm_input: Any) -> int:
        raise NotImplementedError

    def _encode_images(self, mm_input: Any, part: slice, plans: ImagePlans) -> EncodedImages:
        raise NotImplementedError

    def _merge_kept(
        self, encoded: EncodedImages, picks: Sequence[torch.Tensor | None]
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def _micro_batches(self, n: int) -> Iterator[slice]:
        """Images per tower pass: the scheduler charges only the kept placeholders against the
        encoder budget, so one encoder batch can hold far more images than profiling assumed."""
        micro = self.idselect_settings.encoder_micro_batch
        for start in range(0, n, micro):
            yield slice(start, min(start + micro, n))

    def _pick(
        self,
        units: Sequence[torch.Tensor],
        visual_scores: Sequence[torch.Tensor] | None,
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
