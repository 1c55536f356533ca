"""Values of vLLM's own request extensions that vLLM 0.32 accepts and then fails on with a 500;
refused with a 400 instead. Each was found by schema fuzzing (benchmarks/schema_fuzz.py) and has
a regression test (tests/test_schema_fuzz.py, tests/test_edge_fuzz.py).
"""

from __future__ import annotations

import math
from typing import Any

from server.request_rejected import RequestRejected

# The engine receives requests as msgpack, whose integers span [-2**63, 2**64 - 1]; a larger
# top-level integer (`top_k`, `stream_interval`) failed its serialisation with a bare 500 (vLLM
# checks this range itself for `vllm_xargs` only).
ENGINE_INT_RANGE = (-(2**63), 2**64 - 1)
# Ours: validated and consumed before the engine (the plugin clamps budgets to the image).
_OWN_KEYS = ("visual_token_budget", "visual_token_importance")

# Beam search scores divide by seq_len ** length_penalty: beyond this the power under- or
# overflows for any real context length (vLLM: ZeroDivisionError / OverflowError, a 500).
LENGTH_PENALTY_LIMIT = 10.0


def check_vllm_options(body: dict[str, Any], images: int) -> None:
    low, high = ENGINE_INT_RANGE
    for key, value in body.items():
        if (type(value) is int and not low <= value <= high) and key not in _OWN_KEYS:
            raise RequestRejected(
                f"{key!r:.40} must be between -2**63 and 2**64 - 1 (the engine's integer range)",
                str(key)[:100] or None,
            )
    if images and body.get("truncate_prompt_tokens") is not None:
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
