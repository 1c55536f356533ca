"""Qwen2.5-VL with ID-Selection: K post-merger tokens per image, at their original M-RoPE positions.

Mirrors vLLM's `model_executor/models/qwen2_5_vl.py` split (ProcessingInfo, MultiModalProcessor,
model) on the framework's mixins. What this backbone states:

- Selection unit: the post-merger token (one 2x2 group of 14-pixel patches), the token the
  language model sees; an image has `full = t*h*w / 4` of them, which depends on its size, and
  keeps `min(K, full)`. Similarity uses these features (already in the LLM's embedding space,
  which is also where the prompt-aware `text` score compares them with the prompt).
- Importance (its `visual` score; the ViT has no [CLS]): the attention each patch receives in the
  tower's last full-attention block (mean over the image's queries, summed over heads, summed
  over the 2x2 group), captured from that block's own attention inputs; or `norm` (L2 norm of
  the post-merger token), chosen per deployment with `idselect_qwen_importance`. Why this
  default: docs/qwen2_5_vl.md.
- Positions: kept tokens keep their (t, h, w) M-RoPE positions (`mrope`, through vLLM's EVS
  path switched on by `compat.enable_position_recompute`). Videos keep vLLM's EVS pruning when
  it is configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalKwargsItem
from vllm.multimodal.video_prune.evs import compute_retention_mask

from idselect.importance import attention_received, feature_norm, merge_units
from idselect.vllm_plugin.capture import capture_qk, single_call
from idselect.vllm_plugin.compat import enable_position_recompute
from idselect.vllm_plugin.embedding import EncodedImages, SelectionModelMixin
from idselect.vllm_plugin.items import ImagePlans
from idselect.vllm_plugin.mrope import PrunedMRoPEMixin
from idselect.vllm_plugin.processing import (
    ItemTokens,
    SelectionInfoMixin,
    SelectionProcessorMixin,
)

# Deployment setting on the HF config (like PluginSettings' keys): the visual score of this ViT.
VISUAL_SCORE_KEY = "idselect_qwen_importance"
VISUAL_SCORES: tuple[str, ...] = ("attention", "norm")


class QwenVLInfoMixin(SelectionInfoMixin):
    """The Qwen-VL family's counts: one selection unit per post-merger token of the grid."""

    has_cls_token = False

    def item_tokens(self, processed: BatchFeature) -> list[ItemTokens]:
        merge = self.get_hf_config().vision_config.spatial_merge_size
        fulls = [int(g.prod()) // (merge * merge) for g in processed["image_grid_thw"]]
        return [ItemTokens(full, full) for full in fulls]

    def full_tokens(self, width: int, height: int, mm_kwargs: Mapping[str, object]) -> int:
        return self.get_num_image_tokens(
            image_width=width,
            image_height=height,
            image_processor=self.get_image_processor(**mm_kwargs),
            mm_kwargs=mm_kwargs,
        )


class QwenVLProcessorMixin(SelectionProcessorMixin):
    def placeholder_token_ids(self) -> Sequence[int]:
        config = self.info.get_hf_config()
        return (
            config.image_token_id,
            config.video_token_id,
            config.vision_start_token_id,
            config.vision_end_token_id,
        )


class IDSelectQwen2_5_VLProcessingInfo(QwenVLInfoMixin, Qwen2_5_VLProcessingInfo):
    pass


class IDSelectQwen2_5_VLMultiModalProcessor(QwenVLProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    info: IDSelectQwen2_5_VLProcessingInfo


class QwenVLSelectionMixin(SelectionModelMixin, PrunedMRoPEMixin):
    """The Qwen-VL family's embedding step for images: tower with the score block's q/k
    captured, ID-Selection over post-merger tokens, kept rows with their positions."""

    def _init_qwen_selection(self, vllm_config: VllmConfig, family: str, score_block: int) -> None:
        if self.use_data_parallel:
            raise NotImplementedError(
                f"idselect does not support mm_encoder_tp_mode='data' for {family} yet"
            )
        self.visual_score = getattr(self.config, VISUAL_SCORE_KEY, "attention")
        if self.visual_score not in VISUAL_SCORES:
            raise ValueError(f"{VISUAL_SCORE_KEY} must be one of {VISUAL_SCORES}")
        self._score_block = score_block
        self._merge_unit = self.config.vision_config.spatial_merge_size**2
        # Every media embedding now carries position channels (images always, videos too).
        self.is_multimodal_pruning_enabled = True
        runner = enable_position_recompute(vllm_config)
        score = (f"attention received in vision block {score_block}"
                 if self.visual_score == "attention" else "feature norm")
        self._init_selection(
            vllm_config,
            f"{family}; visual score: {score}; M-RoPE recompute via {runner}",
            has_cls_token=False,
        )

    def _selection_units(self, embeds: torch.Tensor) -> torch.Tensor:
        """The part of the tower's output similarity is measured on (all of it by default)."""
        return embeds

    def _to_raster(self, scores: torch.Tensor, metadata: Mapping[str, torch.Tensor]):
        """Per-token scores from the score block's token order to the output's."""
        return scores

    # The hooks take (modality, vLLM's parsed input) pairs: the family serves videos too.

    def _embed_as_vllm(self, item):
        modality, mm_input = item
        grids = mm_input[f"{modality}_grid_thw"].tolist()
        if modality != "image":
            return self._embed_videos(mm_input, grids)
        embeds = self._process_image_input(mm_input)
        return [self._with_positions(e, g) for e, g in zip(embeds, grids, strict=True)]

    def _num_images(self, item) -> int:
        return len(item[1]["image_grid_thw"])

    def _encode_images(self, item, part: slice, plans: ImagePlans) -> EncodedImages:
        """Run the tower on a micro-batch of images, capturing the score block's q/k."""
        image_input = item[1]
        all_grids = image_input["image_grid_thw"].tolist()
        pixels = torch.cat(torch.split(image_input["pixel_values"],
                                       [int(np.prod(g)) for g in all_grids])[part])
        grids = all_grids[part]
        if any(g[0] != 1 for g in grids):
            raise RuntimeError(f"images must have one temporal patch, got grids {grids}")
        metadata = self.visual.prepare_encoder_metadata(grids)
        attn = self.visual.blocks[self._score_block].attn
        capture = plans.any_pruned() and self.visual_score == "attention"
        with capture_qk(attn.attn) if capture else nullcontext() as captured:
            embeds = self.visual(pixels, grid_thw=grids, encoder_metadata=metadata)
        fulls = [int(np.prod(g)) // self._merge_unit for g in grids]
        embeds = list(torch.split(embeds, fulls))
        features = [self._selection_units(e) for e in embeds]
        if not plans.any_pruned():
            scores = None
        elif capture:
            scores = self._attention_scores(captured, attn, metadata, fulls)
        else:
            scores = [feature_norm(f) for f in features]
        return EncodedImages(features, scores, lambda i: features[i], state=(embeds, grids))

    def _merge_kept(self, encoded: EncodedImages, picks) -> list[torch.Tensor]:
        """Kept rows with their own positions."""
        embeds, grids = encoded.state
        return [
            self._with_positions(e if r is None else e.index_select(0, r), g, rows=r)
            for e, g, r in zip(embeds, grids, picks, strict=True)
        ]

    def _attention_scores(
        self,
        captured: list[tuple[torch.Tensor, torch.Tensor]],
        attn: torch.nn.Module,
        metadata: Mapping[str, torch.Tensor],
        fulls: list[int],
    ) -> list[torch.Tensor]:
        """Per image, raster-ordered (full,) attention received by each post-merger token."""
        query, key = single_call(captured, f"vision block {self._score_block}")
        query, key = query[0], key[0]  # (S, heads, head_dim), window order
        unit = self._merge_unit
        window_scores = []
        start = 0
        for full in fulls:
            end = start + full * unit
            patch = attention_received(query[start:end], key[start:end], attn.attn.scale)
            window_scores.append(merge_units(patch, unit))
            start = end
        merged = torch.cat(window_scores)
        # Heads are sharded under tensor parallelism: add the other ranks' partial sums.
        if attn.tp_size > 1:
            merged = tensor_model_parallel_all_reduce(merged)
        return list(torch.split(self._to_raster(merged, metadata), fulls))

    def _pruned_lora_token_counts(
        self, mm_kwargs: MultiModalKwargsItem, num_mm_embeds: int
    ) -> tuple[int, int | None]:
        # Tower and merger see every token of a pruned image; only the LLM sees K.
        full = int(mm_kwargs["image_grid_thw"].data.prod()) // self._merge_unit
        return full * self._merge_unit, full


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectQwen2_5_VLMultiModalProcessor,
    info=IDSelectQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class IDSelectQwen2_5_VLForConditionalGeneration(
    QwenVLSelectionMixin, Qwen2_5_VLForConditionalGeneration
):
    """Qwen2.5-VL whose image embeddings are K post-merger tokens chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # The last of the blocks that attend over the whole image (the others use windows).
        score_block = max(self.config.vision_config.fullatt_block_indexes)
        self._init_qwen_selection(vllm_config, "Qwen2.5-VL", score_block)

    def _vision_inputs(self, kwargs: dict[str, object]):
        for modality, mm_input in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if mm_input is not None:
                pixels = modality == "image" and mm_input["type"] == "pixel_values"
                yield (modality, mm_input), pixels

    def _embed_videos(self, video_input, grids: list[list[int]]) -> list[torch.Tensor]:
        embeds = self._process_video_input(video_input)
        t_factors = self._video_t_factors(video_input)
        out = []
        for emb, grid, t_factor in zip(embeds, grids, t_factors, strict=True):
            rows = None
            if self.video_pruning_rate:  # vLLM's EVS retention, our position channels
                mask = compute_retention_mask(
                    emb, grid, spatial_merge_size=self.visual.spatial_merge_size,
                    q=self.video_pruning_rate,
                )
                rows = mask.nonzero().flatten()
                emb = emb.index_select(0, rows)
            out.append(self._with_positions(emb, grid, t_factor, rows=rows))
        return out

    def _video_t_factors(self, video_input) -> list[float]:
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        seconds = video_input.get("second_per_grid_ts")
        n = len(video_input["video_grid_thw"])
        if seconds is None:
            return [float(tokens_per_second)] * n
        # As vLLM's `iter_mm_grid_thw` (the unpruned layout) and Hugging Face use them.
        return [float(s) * tokens_per_second for s in seconds.flatten().tolist()]

    def _to_raster(self, scores: torch.Tensor, metadata: Mapping[str, torch.Tensor]):
        # The score block sees tokens in attention-window order.
        return scores[metadata["reverse_indices"].to(scores.device)]
