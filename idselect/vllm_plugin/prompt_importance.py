"""Prompt-aware importance in the embedding step: `text` and `unified` sources per image.

Text relevance compares *projected* visual tokens with the prompt's input embeddings (both live
in the language model's embedding space), so images that ask for it project all their tokens
before selection instead of only the kept ones; `cls` images are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from idselect.importance import text_relevance, unified
from idselect.importance_source import IMPORTANCE_SOURCES

_CLS, _TEXT, _UNIFIED = (IMPORTANCE_SOURCES.index(s) for s in ("cls", "text", "unified"))


@dataclass(frozen=True)
class ImagePrompts:
    """Per image: importance source code and the prompt's text ids (-1 padded)."""

    sources: list[int]
    text_ids: torch.Tensor | None  # (images, MAX_TEXT_TOKENS)

    @classmethod
    def from_fields(cls, importance: object, text_ids: object, n: int) -> ImagePrompts:
        if importance is None:
            return cls([_CLS] * n, None)
        sources = [int(s) for s in torch.as_tensor(importance).flatten().tolist()]
        ids = torch.stack(list(text_ids)) if isinstance(text_ids, list) else text_ids
        return cls(sources, ids)

    def __getitem__(self, part: slice) -> ImagePrompts:
        ids = None if self.text_ids is None else self.text_ids[part]
        return ImagePrompts(self.sources[part], ids)

    def any_prompt_aware(self) -> bool:
        return any(s != _CLS for s in self.sources)

    def rescore(
        self,
        cls_scores: torch.Tensor,
        features: torch.Tensor,
        project: Callable[[torch.Tensor], torch.Tensor],
        embed: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Replace [CLS] scores by text or unified scores where an image asked for them."""
        scores = cls_scores.clone().float()
        for i, source in enumerate(self.sources):
            if source == _CLS or self.text_ids is None:
                continue
            ids = self.text_ids[i][self.text_ids[i] >= 0].to(features.device)
            if ids.numel() == 0:
                continue  # nothing to relate to: keep visual saliency
            relevance = text_relevance(project(features[i]), embed(ids))
            scores[i] = relevance if source == _TEXT else unified(cls_scores[i].float(), relevance)
        return scores
