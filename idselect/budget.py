"""The per-image visual token budget: validation, the kept count, and bounded metric labels.

Engine-free so the server, the vLLM plugin and the tests share one definition of what a valid
budget is and what it costs.
"""

from __future__ import annotations

from numbers import Integral

BUDGET_KEY = "visual_token_budget"

# Upper edges of the label buckets; anything larger (but still pruning) is ">192".
_BUCKET_EDGES = (16, 64, 192)
BUDGET_BUCKETS = ("full", *(f"<={e}" for e in _BUCKET_EDGES), f">{_BUCKET_EDGES[-1]}")


class BudgetError(ValueError):
    """A client-supplied budget is invalid; the message names the parameter."""

    param = BUDGET_KEY


def validate_budget(value: object) -> int | None:
    """Return the budget as an int, or None for "no budget given" (server default applies).

    Only true integers >= 1 are accepted: JSON numbers like 1.5 or 16.0, strings, bools, lists and
    non-positive values are client mistakes we refuse rather than guess at.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise BudgetError(
            f"{BUDGET_KEY} must be an integer >= 1 or null, got {type(value).__name__} "
            f"{_short_repr(value)}"
        )
    if value < 1:
        raise BudgetError(f"{BUDGET_KEY} must be an integer >= 1 or null, got {int(value)}")
    return int(value)


def kept_tokens(budget: int | None, full: int) -> int:
    """Visual tokens an image keeps: min(K, full); no budget keeps all."""
    return full if budget is None else min(budget, full)


def budget_bucket(budget: int | None, full: int | None = None) -> str:
    """Map a budget to one of BUDGET_BUCKETS, so metric label values stay bounded."""
    if budget is None or (full is not None and budget >= full):
        return "full"
    for edge in _BUCKET_EDGES:
        if budget <= edge:
            return f"<={edge}"
    return f">{_BUCKET_EDGES[-1]}"


def _short_repr(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
