"""Map the request's `visual_token_budget` (and `visual_token_importance`) onto vLLM's
multimodal processor kwargs.

Clients may send the budget at the top level (the documented way) or as
`mm_processor_kwargs.visual_token_budget`. vLLM would reject any per-request
`mm_processor_kwargs` unless the whole set of Hugging Face processor kwargs is opened to clients;
the server opens it internally and this module lets exactly these two keys through.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from idselect.budget import BUDGET_KEY, BudgetError, kept_tokens, validate_budget
from idselect.importance_source import IMPORTANCE_KEY, validate_importance
from server.request.rejected import RequestRejected
from server.request.vllm_options import check_vllm_options
from server.settings import ServerSettings

__all__ = ["BUDGET_PATHS", "BudgetedRequest", "RequestRejected", "prepare"]

BUDGET_PATHS = ("/v1/chat/completions", "/v1/completions")
_IMAGE_PART_TYPES = {"image_url", "input_image", "image_pil", "image_embeds"}


@dataclass(frozen=True)
class BudgetedRequest:
    body: dict[str, Any]
    budget: int | None  # effective: the request's, else the server default; None = full
    images: int
    stream: bool

    def visual_usage(self, full: int | None) -> dict[str, int] | None:
        """Visual tokens before and after selection, for the response's `usage`."""
        if full is None:
            return None
        return {
            "visual_tokens_original": self.images * full,
            "visual_tokens_kept": self.images * kept_tokens(self.budget, full),
        }


# Request options clients may set, at the top level or inside mm_processor_kwargs.
_OPTIONS: dict[str, Callable[[object], object]] = {
    BUDGET_KEY: validate_budget,
    IMPORTANCE_KEY: validate_importance,
}


def prepare(body: Any, settings: ServerSettings, *, chat: bool = True) -> BudgetedRequest | None:
    """Validate and rewrite a request body; None when it is not ours to judge (vLLM will).

    `chat`: a /v1/chat/completions body (images are counted in its messages); /v1/completions
    bodies carry no images, whatever they contain."""
    if not isinstance(body, dict):
        return None
    mm_kwargs = body.get("mm_processor_kwargs")
    if mm_kwargs is not None and not isinstance(mm_kwargs, dict):
        raise RequestRejected("mm_processor_kwargs must be an object", "mm_processor_kwargs")
    if isinstance(mm_kwargs, dict):
        others = sorted(k for k in mm_kwargs if k not in _OPTIONS)
        if others and not settings.trust_all_mm_kwargs:
            raise RequestRejected(
                f"mm_processor_kwargs may only contain {', '.join(map(repr, _OPTIONS))} on this "
                f"server (got {others[:5]})",
                "mm_processor_kwargs",
                "unsupported_parameter",
            )
    if body.get("media_io_kwargs") and not settings.trust_all_mm_kwargs:
        raise RequestRejected(
            "media_io_kwargs is not accepted per request on this server",
            "media_io_kwargs",
            "unsupported_parameter",
        )

    requested = {key: _requested(body, mm_kwargs, key) for key in _OPTIONS}
    rewritten = {k: v for k, v in body.items() if k not in _OPTIONS}
    kept_mm = {k: v for k, v in (mm_kwargs or {}).items() if k not in _OPTIONS}
    kept_mm.update({k: v for k, v in requested.items() if v is not None})
    if kept_mm:
        rewritten["mm_processor_kwargs"] = kept_mm
    else:
        rewritten.pop("mm_processor_kwargs", None)

    budget = requested[BUDGET_KEY]
    images = _count_images(body.get("messages")) if chat else 0
    check_vllm_options(body, images)
    return BudgetedRequest(
        body=rewritten,
        budget=budget if budget is not None else settings.default_budget,
        images=images,
        stream=body.get("stream") is True,
    )


def _requested(body: dict[str, Any], mm_kwargs: object, key: str) -> Any:
    """The option's value from the top level or mm_processor_kwargs (they must agree)."""
    top = _validated(body, key, key)
    nested = None
    if isinstance(mm_kwargs, dict):
        nested = _validated(mm_kwargs, key, f"mm_processor_kwargs.{key}")
    if top is not None and nested is not None and top != nested:
        raise RequestRejected(f"{key} is given twice with different values ({top} and {nested})",
                              key)
    return top if top is not None else nested


def _validated(container: dict[str, Any], key: str, param: str) -> Any:
    try:
        return _OPTIONS[key](container.get(key))
    except BudgetError as exc:  # ImportanceError is one too
        raise RequestRejected(str(exc).replace(key, param, 1), param) from None


def _count_images(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(
                1 for part in content
                if isinstance(part, dict) and isinstance(part.get("type"), str)
                and part["type"] in _IMAGE_PART_TYPES
            )
    return count
