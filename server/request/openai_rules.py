"""OpenAI's chat/completions request rules where vLLM 0.32 is looser: pure checks, one 400 each.

vLLM accepts any message role (for custom chat templates), content part types an image model
cannot use (audio, video, embeddings, in-process PIL images, parts without a `type`), images in
system / assistant / tool messages, up to any `n`, any `logit_bias` value, and silently ignores
options it cannot honour (`audio`, `modalities: ["audio"]`, `web_search_options`,
`moderation`, the deprecated `functions` / `function_call`). Each
refusal here is a decision recorded in docs/robustness.md; everything not named is left to vLLM
(which already enforces OpenAI's ranges for temperature, top_p, penalties, logprobs, seed,
max_tokens and stop). Malformed shapes (messages not a list, a message not an object) are also
left to vLLM's own validation, which answers 400.
"""

from __future__ import annotations

from typing import Any

from server.request.rejected import RequestRejected

OPENAI_ROLES = ("developer", "system", "user", "assistant", "tool", "function")
# Content part types per role. OpenAI's user parts also include `input_audio` and `file`: valid
# OpenAI, but nothing an image-text model can read, so they are refused as unsupported.
_PARTS_BY_ROLE = {
    "user": ("text", "image_url"),
    "assistant": ("text", "refusal"),
    "system": ("text",),
    "developer": ("text",),
    "tool": ("text",),
}
_OPENAI_ONLY_PARTS = ("input_audio", "file")
MAX_CHOICES = 128  # OpenAI's maximum `n`
LOGIT_BIAS_LIMIT = 100
# Output options this server cannot honour; OpenAI answers them, vLLM ignores them silently.
_UNSUPPORTED_OPTIONS = {
    "audio": "this server returns text only; audio output is not available",
    "web_search_options": "web search is not available on this server",
    "moderation": "moderation is not available on this server",
    "functions": "deprecated function calling (functions) is not supported; use tools",
    "function_call": "deprecated function calling (function_call) is not supported; use "
    "tool_choice",
}


def check_completion_request(body: dict[str, Any]) -> None:
    """Rules shared by /v1/completions and /v1/chat/completions."""
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > MAX_CHOICES:
        raise RequestRejected(f"n must be at most {MAX_CHOICES}, got {n}", "n")
    bias = body.get("logit_bias")
    if isinstance(bias, dict):
        for token, value in bias.items():
            if (isinstance(value, int | float) and not isinstance(value, bool)
                    and not -LOGIT_BIAS_LIMIT <= value <= LOGIT_BIAS_LIMIT):
                raise RequestRejected(
                    f"logit_bias values must be between -{LOGIT_BIAS_LIMIT} and "
                    f"{LOGIT_BIAS_LIMIT}, got {value!r:.40} for token {token!r:.40}",
                    "logit_bias",
                )


def check_chat_request(body: dict[str, Any]) -> None:
    """OpenAI's chat rules that vLLM does not enforce; raises RequestRejected (400)."""
    check_completion_request(body)
    for key, reason in _UNSUPPORTED_OPTIONS.items():
        if body.get(key) is not None:
            raise RequestRejected(reason, key, "unsupported_parameter")
    modalities = body.get("modalities")
    if isinstance(modalities, list) and any(m != "text" for m in modalities):
        raise RequestRejected(
            "this server returns text only; modalities may only contain 'text'", "modalities",
            "unsupported_value",
        )
    messages = body.get("messages")
    if isinstance(messages, list):
        for i, message in enumerate(messages):
            if isinstance(message, dict):
                _check_message(i, message)
        _check_answer_role(body, messages)


def _check_answer_role(body: dict[str, Any], messages: list[Any]) -> None:
    """vLLM's `add_generation_prompt: false` continues the last message and answers in that
    message's role; OpenAI answers always come from the assistant. Allowed only where the two
    agree: continuing an assistant message."""
    if body.get("add_generation_prompt") is not False or not messages:
        return
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") != "assistant":
        raise RequestRejected(
            "add_generation_prompt: false continues the last message and is only accepted when "
            "that message has role 'assistant' (answers always come from the assistant)",
            "add_generation_prompt",
        )


def _check_message(i: int, message: dict[str, Any]) -> None:
    role = message.get("role")
    if not isinstance(role, str) or role not in OPENAI_ROLES:
        got = "no role" if role is None else f"{role!r:.40}"
        raise RequestRejected(
            f"messages[{i}].role must be one of {', '.join(map(repr, OPENAI_ROLES))} "
            f"(got {got})",
            f"messages[{i}].role",
        )
    if role == "tool" and not isinstance(message.get("tool_call_id"), str):
        raise RequestRejected(
            f"messages[{i}].tool_call_id is required for role 'tool' (a string)",
            f"messages[{i}].tool_call_id",
        )
    if role == "function" and not isinstance(message.get("name"), str):
        raise RequestRejected(
            f"messages[{i}].name is required for role 'function' (a string)",
            f"messages[{i}].name",
        )
    content = message.get("content")
    if isinstance(content, list) and role in _PARTS_BY_ROLE:
        for j, part in enumerate(content):
            _check_part(i, j, role, part)


def _check_part(i: int, j: int, role: str, part: Any) -> None:
    param = f"messages[{i}].content[{j}]"
    kind = part.get("type") if isinstance(part, dict) else None
    if not isinstance(kind, str):
        raise RequestRejected(
            f"{param} must be an object with a string 'type' (e.g. 'text' or 'image_url')",
            f"{param}.type" if isinstance(part, dict) else param,
        )
    allowed = _PARTS_BY_ROLE[role]
    if kind in allowed:
        return
    if role == "user" and kind in _OPENAI_ONLY_PARTS:
        raise RequestRejected(
            f"{param}.type {kind!r} is not supported by this model: it reads text and images "
            "only ('text', 'image_url')",
            f"{param}.type",
            "unsupported_value",
        )
    raise RequestRejected(
        f"{param}.type must be one of {', '.join(map(repr, allowed))} in a {role!r} message "
        f"(got {kind!r:.40})",
        f"{param}.type",
    )
