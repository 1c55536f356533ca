"""Map the request's `visual_token_budget` onto vLLM's multimodal processor kwargs.

Clients may send the budget at the top level (the documented way) or as
`mm_processor_kwargs.visual_token_budget`. vLLM would reject any per-request
`mm_processor_kwargs` unless the whole set of Hugging Face processor kwargs is opened to clients;
the server opens it internally and this module lets exactly the budget key through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idselect.budget import BUDGET_KEY, BudgetError, kept_tokens, validate_budget
from server.settings import ServerSettings

BUDGET_PATHS = ("/v1/chat/completions", "/v1/completions")
_IMAGE_PART_TYPES = {"image_url", "input_image", "image_pil", "image_embeds"}


class RequestRejected(Exception):
    def __init__(self, message: str, param: str, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.param = param
        self.code = code


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


def prepare(body: Any, settings: ServerSettings) -> BudgetedRequest | None:
    """Validate and rewrite a request body; None when it is not ours to judge (vLLM will)."""
    if not isinstance(body, dict):
        return None
    top = _validated(body, BUDGET_KEY, BUDGET_KEY)
    mm_kwargs = body.get("mm_processor_kwargs")
    nested = None
    if isinstance(mm_kwargs, dict):
        nested = _validated(mm_kwargs, BUDGET_KEY, f"mm_processor_kwargs.{BUDGET_KEY}")
        others = sorted(k for k in mm_kwargs if k != BUDGET_KEY)
        if others and not settings.trust_all_mm_kwargs:
            raise RequestRejected(
                f"mm_processor_kwargs may only contain '{BUDGET_KEY}' on this server "
                f"(got {others[:5]})",
                "mm_processor_kwargs",
                "unsupported_parameter",
            )
    if body.get("media_io_kwargs") and not settings.trust_all_mm_kwargs:
        raise RequestRejected(
            "media_io_kwargs is not accepted per request on this server",
            "media_io_kwargs",
            "unsupported_parameter",
        )
    if top is not None and nested is not None and top != nested:
        raise RequestRejected(
            f"{BUDGET_KEY} is given twice with different values ({top} and {nested})", BUDGET_KEY
        )

    requested = top if top is not None else nested
    rewritten = {k: v for k, v in body.items() if k != BUDGET_KEY}
    if isinstance(mm_kwargs, dict):
        mm_kwargs = {k: v for k, v in mm_kwargs.items() if k != BUDGET_KEY}
    if requested is not None:
        mm_kwargs = {**(mm_kwargs or {}), BUDGET_KEY: requested}
    if mm_kwargs:
        rewritten["mm_processor_kwargs"] = mm_kwargs
    else:
        rewritten.pop("mm_processor_kwargs", None)

    return BudgetedRequest(
        body=rewritten,
        budget=requested if requested is not None else settings.default_budget,
        images=_count_images(body.get("messages")),
        stream=body.get("stream") is True,
    )


def _validated(container: dict[str, Any], key: str, param: str) -> int | None:
    try:
        return validate_budget(container.get(key))
    except BudgetError as exc:
        raise RequestRejected(str(exc).replace(BUDGET_KEY, param, 1), param) from None


def _count_images(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    count = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            count += sum(
                1 for part in content
                if isinstance(part, dict) and part.get("type") in _IMAGE_PART_TYPES
            )
    return count
