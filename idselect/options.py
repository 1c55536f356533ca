"""The per-request idselect options: one typed value, validated once where a request enters.

A client (or a deployment default) states the options under these keys, at the top level of an
OpenAI request body or in `mm_processor_kwargs` (offline `vllm.LLM` users). `VisualOptions.parse`
is the only validator: the HTTP layer calls it for the server's clients (OpenAI-shaped 400s naming
the field), the multimodal processor for offline users, the plugin settings for deployment
defaults. Everything after works on the typed value.

- `visual_token_budget`: visual tokens an image may keep, an integer >= 1. `None` (not given,
  or JSON null) means no budget: the image is served unpruned. There is no other spelling of
  "no pruning" (0, -1 and the like are refused).
- `visual_token_importance`: what ranks an image's tokens before ID-Selection picks them.
  - `visual`: the backbone's own visual saliency ([CLS]->patch attention on CLIP towers, the
    attention patches receive in a full-attention block on Qwen2.5-VL's ViT); the default.
  - `cls`: the same, by its older name; only on towers that have a [CLS] token.
  - `text`: cosine between each visual token, in the language model's embedding space, and the
    prompt's token embeddings. A pre-LLM stand-in for the paper's cross-modal score: inside the
    image-embedding step the LLM has not run, so no text-to-image attention exists.
  - `unified`: the mean of the two, each min-max normalised per image.
- `visual_token_selector`: how the K tokens are chosen (`idselect.baselines`), for A/B runs:
  `id_select` (the default: importance and diversity), `topk` (importance only), `divprune`
  (diversity only), `random` (uniform, seeded per image: the same image draws the same tokens),
  `pool` (uniform spatial sampling of the token grid).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from idselect.baselines import SELECTOR_NAMES

BUDGET_KEY = "visual_token_budget"
IMPORTANCE_KEY = "visual_token_importance"
SELECTOR_KEY = "visual_token_selector"
OPTION_KEYS = (BUDGET_KEY, IMPORTANCE_KEY, SELECTOR_KEY)

# The importance sources an image can be ranked by (encoded by index in the item fields).
IMPORTANCE_SOURCES: tuple[str, ...] = ("visual", "text", "unified")
ImportanceSource = Literal["visual", "text", "unified"]
# Accepted request values: the sources plus "cls", the older name of "visual" for [CLS] towers.
IMPORTANCE_NAMES: tuple[str, ...] = (*IMPORTANCE_SOURCES, "cls")
# The selectors (`idselect.baselines`' registry; encoded by index in the item fields, and a
# bounded metric label).
SELECTORS: tuple[str, ...] = SELECTOR_NAMES


class OptionError(ValueError):
    """A client-supplied option is invalid; `param` names it as the client sent it (the HTTP
    layer answers it with OpenAI's `param`, the processor hands it to vLLM as
    `VLLMValidationError.parameter`)."""

    param = BUDGET_KEY

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        if param is not None:
            self.param = param


class BudgetError(OptionError):
    param = BUDGET_KEY


class ImportanceError(OptionError):
    param = IMPORTANCE_KEY


class SelectorError(OptionError):
    param = SELECTOR_KEY


@dataclass(frozen=True)
class VisualOptions:
    """What one request (or a deployment default) asks of the visual tokens.

    `None` fields were not given. `resolved` fills them from the deployment defaults; after
    that, `budget is None` is the one meaning of "no pruning" and `importance` is set.
    """

    budget: int | None = None
    importance: str | None = None
    selector: str | None = None

    @classmethod
    def parse(cls, values: Mapping[str, object], *, prefix: str = "") -> VisualOptions:
        """Validate the option keys of a mapping (other keys are ignored).

        `prefix` is how the client addressed the mapping (e.g. "mm_processor_kwargs."), so that
        an error's `param` names exactly the field the client sent.
        """
        return cls(
            budget=parse_budget(values.get(BUDGET_KEY), prefix + BUDGET_KEY),
            importance=_importance(values.get(IMPORTANCE_KEY), prefix + IMPORTANCE_KEY),
            selector=_name(values.get(SELECTOR_KEY), prefix + SELECTOR_KEY, SELECTORS,
                           SelectorError),
        )

    def resolved(self, defaults: VisualOptions) -> VisualOptions:
        """These options, with what they leave unset taken from `defaults`, then built-ins."""
        budget = self.budget if self.budget is not None else defaults.budget
        importance = self.importance or defaults.importance or "visual"
        selector = self.selector or defaults.selector or "id_select"
        return VisualOptions(budget, importance, selector)

    def merged(self, other: VisualOptions, *, where: str = "mm_processor_kwargs") -> VisualOptions:
        """Options given in two places (top level and `where`): they must not disagree."""
        fields = {}
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine is not None and theirs is not None and mine != theirs:
                key = _KEYS[f.name]
                raise OptionError(
                    f"{key} is given twice with different values ({mine!r} at the top level "
                    f"and {theirs!r} in {where})",
                    key,
                )
            fields[f.name] = mine if mine is not None else theirs
        return VisualOptions(**fields)

    @property
    def source(self) -> ImportanceSource:
        """The importance source (resolved options): `cls` is `visual` by its older name."""
        if self.importance is None:
            raise ValueError("unresolved options have no importance source")
        return "visual" if self.importance == "cls" else self.importance  # type: ignore[return-value]

    def as_kwargs(self) -> dict[str, object]:
        """The given options as multimodal processor kwargs (unset ones left out)."""
        return {
            _KEYS[f.name]: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


_KEYS = {"budget": BUDGET_KEY, "importance": IMPORTANCE_KEY, "selector": SELECTOR_KEY}


class RequestFields(BaseModel):
    """The options as request fields, for documents that describe requests (the served
    `/openapi.json`): the same rules `VisualOptions.parse` enforces, as JSON Schema (which
    cannot tell 16 from 16.0; the parser refuses the float)."""

    visual_token_budget: Annotated[int, Field(ge=1)] | None = Field(
        default=None, title="Visual Token Budget",
        description="Visual tokens each image may keep after ID-Selection (null or absent: the "
        "server default; a budget >= the image's token count keeps all).")
    visual_token_importance: Literal[IMPORTANCE_NAMES] | None = Field(
        default=None, title="Visual Token Importance",
        description="Importance score ID-Selection ranks visual tokens by: visual (the "
        "vision tower's own saliency), text (relevance to the prompt), unified (their mean); "
        "cls is visual's older name on towers with a [CLS] token (null or absent: the server "
        "default).")
    visual_token_selector: Literal[SELECTORS] | None = Field(
        default=None, title="Visual Token Selector",
        description="How the kept visual tokens are chosen, for A/B comparisons: id_select "
        "(importance and diversity), topk, divprune, random (seeded per image), pool (null or "
        "absent: the server default).")

    @classmethod
    def json_schema_properties(cls) -> dict[str, dict]:
        return cls.model_json_schema()["properties"]


def parse_budget(value: object, param: str = BUDGET_KEY) -> int | None:
    """A visual token budget: an integer >= 1, or None when not given (the one validator of a
    budget: requests, deployment defaults and the deployment's maximum alike)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BudgetError(
            f"{param} must be an integer >= 1 or null, got {type(value).__name__} "
            f"{_short_repr(value)}",
            param,
        )
    if value < 1:
        raise BudgetError(f"{param} must be an integer >= 1 or null, got {int(value)}", param)
    return int(value)


def _importance(value: object, param: str) -> str | None:
    return _name(value, param, IMPORTANCE_NAMES, ImportanceError)


def _name(value: object, param: str, names: tuple[str, ...], error: type[OptionError]
          ) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in names:
        raise error(
            f"{param} must be one of {', '.join(names)} or null, got {_short_repr(value)}",
            param,
        )
    return value


def _short_repr(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
