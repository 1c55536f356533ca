"""Values of vLLM's own request fields that vLLM 0.32 accepts and then fails on with a 500;
refused with a 400 instead. Each was found by schema fuzzing (devtools/schema_fuzz.py) or by
running vLLM's request models on wrongly typed fields (tests/test_vllm_request_rules.py), and
has a regression test (tests/test_schema_fuzz.py, tests/test_edge_fuzz.py).
"""

from __future__ import annotations

import math
from typing import Any

from idselect.options import OPTION_KEYS
from server.request.rejected import RequestRejected

# The engine receives requests as msgpack, whose integers span [-2**63, 2**64 - 1]; a larger
# integer failed its serialisation with a bare 500, at the top level (`top_k`, `stream_interval`)
# and nested alike (`stop_token_ids: [2**64]`, an integer in a `response_format` JSON schema);
# vLLM checks this range itself for `vllm_xargs` only. So every integer in the body is checked.
ENGINE_INT_RANGE = (-(2**63), 2**64 - 1)
# Deeper bodies are refused before this runs (the server's JSON nesting limit); stop early anyway.
_MAX_DEPTH = 64
# Ours: validated and consumed before the engine (the plugin clamps budgets to the image).
_OWN_KEYS = OPTION_KEYS

# Fields vLLM's request models read in `model_validator(mode="before")` hooks, before pydantic
# checks their types, and the JSON type those hooks assume: any other type crashed the hook
# (`structured_outputs.get` on a list: AttributeError; iterating `messages: 5` or `null`:
# TypeError), a 500 where vLLM means a 400. tests/test_vllm_request_rules.py finds every such
# field. `structured_outputs` may also be null; chat's `messages`, when present, may not.
PRE_VALIDATED_FIELDS: dict[str, tuple[type, str]] = {"structured_outputs": (dict, "an object")}
PRE_VALIDATED_CHAT_FIELDS: dict[str, tuple[type, str]] = {"messages": (list, "an array")}

# Beam search scores divide by seq_len ** length_penalty: beyond this the power under- or
# overflows for any real context length (vLLM: ZeroDivisionError / OverflowError, a 500).
LENGTH_PENALTY_LIMIT = 10.0


def _int_out_of_range(value: Any, path: str, depth: int = 0) -> str | None:
    """The path of the first integer outside ENGINE_INT_RANGE in `value`, or None."""
    if type(value) is int:
        low, high = ENGINE_INT_RANGE
        return None if low <= value <= high else path
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{key}" if path else str(key), item) for key, item in value.items())
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    for where, item in items:
        found = _int_out_of_range(item, where, depth + 1)
        if found is not None:
            return found
    return None


def check_pre_validated_types(body: dict[str, Any], chat: bool) -> None:
    """The fields vLLM's pre-validation hooks read have the JSON type the hooks assume."""
    for key, (kind, name) in PRE_VALIDATED_FIELDS.items():
        value = body.get(key)
        if value is not None and not isinstance(value, kind):
            raise RequestRejected(f"{key} must be {name} or null, got {_kind(value)}", key)
    for key, (kind, name) in (PRE_VALIDATED_CHAT_FIELDS if chat else {}).items():
        if key in body and not isinstance(body[key], kind):
            raise RequestRejected(f"{key} must be {name}, got {_kind(body[key])}", key)


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r:.40}"


def check_vllm_options(body: dict[str, Any], has_images: bool, chat: bool = True) -> None:
    check_pre_validated_types(body, chat)
    checked = {key: value for key, value in body.items() if key not in _OWN_KEYS}
    where = _int_out_of_range(checked, "")
    if where is not None:
        raise RequestRejected(
            f"{where!r:.60} must be between -2**63 and 2**64 - 1 (the engine's integer range)",
            where[:100] or None,
        )
    if has_images and body.get("truncate_prompt_tokens") is not None:
        # vLLM truncates the token ids before it expands image placeholders; a cut through an
        # image failed with "Failed to apply prompt replacement" (500, connection dropped).
        raise RequestRejected(
            "truncate_prompt_tokens cannot be combined with images: truncation would cut "
            "through an image's tokens",
            "truncate_prompt_tokens",
            "unsupported_parameter",
        )
    penalty = body.get("length_penalty")
    if (body.get("use_beam_search") is True and isinstance(penalty, int | float)
            and not isinstance(penalty, bool)
            and not (math.isfinite(penalty) and abs(penalty) <= LENGTH_PENALTY_LIMIT)):
        raise RequestRejected(
            f"length_penalty must be between -{LENGTH_PENALTY_LIMIT:g} and "
            f"{LENGTH_PENALTY_LIMIT:g} with beam search, got {penalty!r:.40}",
            "length_penalty",
        )
