"""What a visual token budget keeps, and the bounded metric label it is counted under.

Engine-free so that the server, the vLLM plugin and the tests share one definition. The budget
itself is validated in `idselect.options`.
"""

from __future__ import annotations

# Upper edges of the label buckets; anything larger (but still pruning) is ">192".
_BUCKET_EDGES = (16, 64, 192)
BUDGET_BUCKETS = ("full", *(f"<={e}" for e in _BUCKET_EDGES), f">{_BUCKET_EDGES[-1]}")


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
