"""The per-image fields that carry a request's selection plan from the processor to the model.

The processor adds them to every image it processes (cached with the item, part of its hash), and
the model's embedding step reads them back as `ImagePlans`. Declared `batched("image",
keep_on_cpu=True)`: one value per image, and every image has them so that items batch together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated

import torch
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.utils.tensor_schema import TensorSchema, TensorShape

from idselect.importance import text_relevance, unified
from idselect.options import IMPORTANCE_SOURCES, SELECTORS, ImportanceSource

# Tokens the image keeps; 0 encodes "not pruned" (a tensor holds no None).
KEEP_FIELD = "idselect_num_kept"
# Importance source (index into IMPORTANCE_SOURCES) and, for the prompt-aware ones, the prompt's
# text token ids, -1 padded: the embedding step has no prompt of its own.
IMPORTANCE_FIELD = "idselect_importance"
TEXT_FIELD = "idselect_text_ids"
# Selector (index into SELECTORS) and the image's own seed (for `random`: a hash of its pixels).
SELECTOR_FIELD = "idselect_selector"
SEED_FIELD = "idselect_seed"
FIELDS = (KEEP_FIELD, IMPORTANCE_FIELD, TEXT_FIELD, SELECTOR_FIELD, SEED_FIELD)
MAX_TEXT_TOKENS = 256


def fields_config() -> dict[str, MultiModalFieldConfig]:
    return {name: MultiModalFieldConfig.batched("image", keep_on_cpu=True) for name in FIELDS}


def encode(
    keeps: Sequence[int | None],
    source: ImportanceSource,
    text_ids: Sequence[int],
    selector: str,
    seeds: Sequence[int],
) -> dict[str, torch.Tensor]:
    """The fields for a request's images: kept count (None = unpruned), importance source,
    prompt ids, selector and per-image seeds."""
    n = len(keeps)
    text = torch.full((n, MAX_TEXT_TOKENS), -1, dtype=torch.long)
    ids = list(text_ids)[-MAX_TEXT_TOKENS:]
    if ids:
        text[:, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return {
        KEEP_FIELD: torch.tensor([k or 0 for k in keeps], dtype=torch.long),
        IMPORTANCE_FIELD: torch.full((n,), IMPORTANCE_SOURCES.index(source), dtype=torch.long),
        TEXT_FIELD: text,
        SELECTOR_FIELD: torch.full((n,), SELECTORS.index(selector), dtype=torch.long),
        SEED_FIELD: torch.tensor(list(seeds), dtype=torch.long),
    }


class ImagePlanInputs(TensorSchema):
    """The fields as the embedding step receives them for a batch of images.

    Dimensions:
        - bn: images in the encoder batch
        - t: prompt token ids carried per image (MAX_TEXT_TOKENS)
    """

    idselect_num_kept: Annotated[torch.Tensor, TensorShape("bn")]  # 0: not pruned
    idselect_importance: Annotated[torch.Tensor, TensorShape("bn")]  # IMPORTANCE_SOURCES index
    idselect_text_ids: Annotated[torch.Tensor, TensorShape("bn", MAX_TEXT_TOKENS)]  # -1 padded
    idselect_selector: Annotated[torch.Tensor, TensorShape("bn")]  # SELECTORS index
    idselect_seed: Annotated[torch.Tensor, TensorShape("bn")]


def item_keep(item: Mapping[str, object]) -> int | None:
    """Kept count of one processed item (a `MultiModalKwargsItem`); None = not pruned."""
    if KEEP_FIELD not in item:
        return None
    return int(item[KEEP_FIELD].data) or None


@dataclass(frozen=True)
class ImagePlans:
    """Per image of an encoder batch: kept count (None = unpruned), source, prompt ids."""

    keeps: list[int | None]
    sources: list[ImportanceSource]
    text_ids: torch.Tensor | None  # (images, MAX_TEXT_TOKENS)
    selectors: list[str]
    seeds: list[int]

    @classmethod
    def unpruned(cls, n: int) -> ImagePlans:
        return cls([None] * n, ["visual"] * n, None, ["id_select"] * n, [0] * n)

    @classmethod
    def pop(cls, kwargs: dict[str, object]) -> ImagePlans | None:
        """Take the fields out of `embed_multimodal`'s kwargs; None when there are none
        (precomputed embeddings, or no image in this batch)."""
        values = {name: kwargs.pop(name, None) for name in FIELDS}
        if values[KEEP_FIELD] is None:
            return None
        fields = ImagePlanInputs(**{
            name: torch.stack(list(v)) if isinstance(v, list | tuple) else torch.as_tensor(v)
            for name, v in values.items()
        })
        return cls(
            [int(k) or None for k in fields.idselect_num_kept.tolist()],
            [IMPORTANCE_SOURCES[int(c)] for c in fields.idselect_importance.tolist()],
            fields.idselect_text_ids,
            [SELECTORS[int(c)] for c in fields.idselect_selector.tolist()],
            [int(x) for x in fields.idselect_seed.tolist()],
        )

    def __len__(self) -> int:
        return len(self.keeps)

    def __getitem__(self, part: slice) -> ImagePlans:
        ids = None if self.text_ids is None else self.text_ids[part]
        return ImagePlans(self.keeps[part], self.sources[part], ids, self.selectors[part],
                          self.seeds[part])

    def any_pruned(self) -> bool:
        return any(k is not None for k in self.keeps)

    def prompt_aware(self, i: int) -> bool:
        return self.sources[i] != "visual" and self.keeps[i] is not None

    def prompt_ids(self, i: int) -> torch.Tensor:
        assert self.text_ids is not None
        return self.text_ids[i][self.text_ids[i] >= 0]

    def score(
        self,
        i: int,
        visual: torch.Tensor,
        llm_tokens: Callable[[], torch.Tensor],
        embed_ids: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Image i's importance: its visual score, or the prompt-aware one it asked for.

        `llm_tokens()` gives the image's tokens in the language model's embedding space (only
        called for prompt-aware images: it may project every token); `embed_ids` is the LLM's
        input embedding. A prompt without text keeps the visual score.
        """
        if not self.prompt_aware(i):
            return visual
        ids = self.prompt_ids(i)
        if ids.numel() == 0:
            return visual
        tokens = llm_tokens()
        relevance = text_relevance(tokens, embed_ids(ids.to(tokens.device)))
        if self.sources[i] == "text":
            return relevance
        return unified(visual.float(), relevance)
