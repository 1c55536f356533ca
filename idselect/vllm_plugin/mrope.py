"""M-RoPE for pruned media: kept tokens at their own (t, h, w) positions, text unmoved.

For the Qwen-VL family. Each media embedding leaves the embedding step with 8 extra channels, its
tokens' positions (`encode_positions`); vLLM's model runner strips them and calls the model's
`recompute_mrope_positions` (the EVS path, switched on by `compat.enable_position_recompute`).
Before the encoder runs, `get_mrope_input_positions` lays out the prompt with each item's
placeholder count, and the text after an item starts at base + extent, whichever tokens are kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from vllm.multimodal.inputs import MultiModalFeatureSpec
from vllm.multimodal.video_prune.evs import compute_mrope_for_media

from idselect.vllm_plugin.compat import ChecksVLLMOverrides, overrides_vllm

# Extra channels appended to each media embedding for `recompute_mrope_positions`: (t, h, w,
# extent), each split into a high and a low base-256 digit so that bf16 (exact only up to 256)
# carries them exactly.
POS_CHANNELS = 8
_POS_BASE = 256


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


class PrunedMRoPEMixin(ChecksVLLMOverrides):
    """For a Qwen-VL model class: positions of pruned media. Uses vLLM's `iter_mm_grid_thw`,
    `self.config` (image/video token ids, text hidden size) and `self.visual.spatial_merge_size`.
    """

    def _iter_media(
        self, mm_features: list[MultiModalFeatureSpec]
    ) -> Iterator[tuple[int, int, int, int, float, int]]:
        """(offset, t, h, w, t_factor, placeholders) per item, in prompt order."""
        by_offset = sorted(mm_features, key=lambda f: f.mm_position.offset)
        grids = self.iter_mm_grid_thw(by_offset)
        for feature, (offset, t, h, w, t_factor) in zip(by_offset, grids, strict=True):
            yield offset, t, h, w, t_factor, feature.mm_position.length

    @overrides_vllm
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

    @overrides_vllm
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
        stripped = [mm[:, :-POS_CHANNELS] for mm in multimodal_embeddings]
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
                rows = decode_positions(mm[:, -POS_CHANNELS:]).to(positions.device)[:, :3].T
                if start + local + rows.shape[1] > end:
                    raise RuntimeError(
                        f"idselect: {rows.shape[1]} embeddings from token {start + local} "
                        f"overrun the placeholders of the media item at [{start}, {end})"
                    )
                base = positions[-1, start - 1] + 1 if start > 0 else 0
                positions[:, start + local : start + local + rows.shape[1]] = rows + base
        delta = int(positions.max()) + 1 - n if n else 0
        return stripped, positions, delta

    def _media_channels(self) -> int:
        """Channels of a media embedding once its position channels are stripped."""
        return self.config.text_config.hidden_size

    @overrides_vllm
    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if multimodal_embeddings is not None:
            hidden = self._media_channels()
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


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True in a 1-D bool tensor."""
    padded = torch.nn.functional.pad(mask.to(torch.int8), (1, 1))
    edges = (padded[1:] - padded[:-1]).nonzero().flatten().tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))
