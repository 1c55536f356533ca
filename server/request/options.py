"""The idselect options of a completion request, validated once, handed to vLLM's processor.

Clients may send `visual_token_budget` / `visual_token_importance` / `visual_token_selector` at
the top level (the documented way) or in `mm_processor_kwargs`. Both are parsed here into one
`VisualOptions` (`idselect.options`: the only validator). The HTTP layer hands that value to the
processor (`usage.request`), and rewrites the body so that the options also sit in
`mm_processor_kwargs`, where vLLM's cache hashes see them. vLLM would reject any per-request
`mm_processor_kwargs` unless every Hugging Face processor kwarg is opened to clients; the server
opens them internally and this module lets exactly our keys through.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from idselect.options import OPTION_KEYS, OptionError, VisualOptions
from server.request.rejected import RequestRejected
from server.request.vllm_options import check_vllm_options
from server.settings import ServerSettings

__all__ = ["OPTION_PATHS", "ParsedRequest", "RequestRejected", "prepare"]

OPTION_PATHS = ("/v1/chat/completions", "/v1/completions")
_IMAGE_PART_TYPES = {"image_url", "input_image", "image_pil", "image_embeds"}


@dataclass(frozen=True)
class ParsedRequest:
    body: dict[str, Any]  # rewritten for vLLM
    options: VisualOptions  # as the client gave them (the processor adds the defaults)
    stream: bool


def prepare(body: Any, settings: ServerSettings, *, chat: bool = True) -> ParsedRequest | None:
    """Validate and rewrite a request body; None when it is not ours to judge (vLLM will).

    `chat`: a /v1/chat/completions body (its messages may hold images); /v1/completions bodies
    carry no images, whatever they contain."""
    if not isinstance(body, dict):
        return None
    mm_kwargs = body.get("mm_processor_kwargs")
    if mm_kwargs is not None and not isinstance(mm_kwargs, dict):
        raise RequestRejected("mm_processor_kwargs must be an object", "mm_processor_kwargs")
    if isinstance(mm_kwargs, dict):
        others = sorted(k for k in mm_kwargs if k not in OPTION_KEYS)
        if others and not settings.trust_all_mm_kwargs:
            raise RequestRejected(
                f"mm_processor_kwargs may only contain {', '.join(map(repr, OPTION_KEYS))} on "
                f"this server (got {others[:5]})",
                "mm_processor_kwargs",
                "unsupported_parameter",
            )
    if body.get("media_io_kwargs") and not settings.trust_all_mm_kwargs:
        raise RequestRejected(
            "media_io_kwargs is not accepted per request on this server",
            "media_io_kwargs",
            "unsupported_parameter",
        )
    try:
        options = VisualOptions.parse(body)
        if isinstance(mm_kwargs, dict):
            options = options.merged(VisualOptions.parse(mm_kwargs, prefix="mm_processor_kwargs."))
    except OptionError as exc:
        raise RequestRejected(str(exc), exc.param) from None

    rewritten = {k: v for k, v in body.items() if k not in OPTION_KEYS}
    kept_mm = {k: v for k, v in (mm_kwargs or {}).items() if k not in OPTION_KEYS}
    kept_mm.update(options.as_kwargs())
    if kept_mm:
        rewritten["mm_processor_kwargs"] = kept_mm
    else:
        rewritten.pop("mm_processor_kwargs", None)
    check_vllm_options(body, _has_images(body.get("messages")) if chat else False, chat)
    return ParsedRequest(body=rewritten, options=options, stream=body.get("stream") is True)


def _has_images(messages: Any) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(part, dict) and isinstance(part.get("type"), str)
            and part["type"] in _IMAGE_PART_TYPES
            for part in content
        ):
            return True
    return False
