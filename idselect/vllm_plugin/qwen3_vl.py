"""Qwen3-VL with ID-Selection: K post-merger tokens per image, DeepStack levels pruned alike.

Subclasses the Qwen2.5-VL plugin's family bases (as vLLM's `qwen3_vl.py` builds on its Qwen2.5-VL
module). What this backbone states:

- Selection unit: the post-merger token, as in Qwen2.5-VL; similarity on the main merger's
  output. The tower's output row of a token is its main embedding followed by one embedding per
  DeepStack level (the intermediate blocks' own mergers), so keeping a row keeps that token's
  DeepStack rows with it: every level is pruned with the same indices, and vLLM splits the
  levels off (`_compute_deepstack_embeds`) only after the kept rows are in place.
- Importance (`visual`): the attention each patch receives in the tower's last block (every
  block attends over the whole image; no window reordering), summed over the 2x2 group; or the
  feature norm. Chosen as for Qwen2.5-VL: docs/qwen3_vl.md.
- Positions: kept tokens keep their (t, h, w) M-RoPE positions (`mrope`), text after an image
  where the full image would have put it.
- Images only: videos (which Qwen3-VL lays out frame by frame, with timestamps between) are not
  supported by this plugin yet; the ProcessingInfo declares a video limit of 0, so vLLM refuses
  video inputs and never profiles them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFeatureSpec

from idselect.vllm_plugin.compat import overrides_vllm
from idselect.vllm_plugin.qwen2_5_vl import (
    QwenVLInfoMixin,
    QwenVLProcessorMixin,
    QwenVLSelectionMixin,
)


class Qwen3VLInfoMixin(QwenVLInfoMixin):
    @overrides_vllm
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        # Videos stay a known modality (its processor kwargs are part of Qwen3-VL's schema) with
        # a limit of 0: vLLM refuses video inputs and profiles none.
        return {"image": None, "video": 0}


class IDSelectQwen3VLProcessingInfo(Qwen3VLInfoMixin, Qwen3VLProcessingInfo):
    pass


class IDSelectQwen3VLMultiModalProcessor(QwenVLProcessorMixin, Qwen3VLMultiModalProcessor):
    pass


class Qwen3VLSelectionMixin(QwenVLSelectionMixin):
    """Qwen3-VL's embedding step. The MoE variant shares the vision path and would subclass
    this too; it is not registered: no tiny MoE checkpoint in the layout vLLM loads could be
    built here to test it (transformers 5 saves fused experts vLLM's loader rejects)."""

    family = "Qwen3-VL"

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        score_block = self.config.vision_config.depth - 1
        self._init_qwen_selection(vllm_config, self.family, score_block)

    def _vision_inputs(self, kwargs: dict[str, object]):
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is not None:
            yield ("image", image_input), image_input["type"] == "pixel_values"

    def _selection_units(self, embeds: torch.Tensor) -> torch.Tensor:
        return embeds[:, : self.visual_dim]  # the main merger's output, not the DeepStack levels

    def _media_channels(self) -> int:
        return self.visual_dim + self.multiscale_dim

    def _iter_media(
        self, mm_features: list[MultiModalFeatureSpec]
    ) -> Iterator[tuple[int, int, int, int, float, int]]:
        merge = self.config.vision_config.spatial_merge_size
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality != "image":
                raise RuntimeError(f"idselect's Qwen3-VL serves images, got {feature.modality}")
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            yield feature.mm_position.offset, t, h // merge, w // merge, 1.0, (
                feature.mm_position.length
            )


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectQwen3VLMultiModalProcessor,
    info=IDSelectQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class IDSelectQwen3VLForConditionalGeneration(
    Qwen3VLSelectionMixin, Qwen3VLForConditionalGeneration
):
    """Qwen3-VL whose image embeddings are K post-merger tokens chosen by ID-Selection."""

