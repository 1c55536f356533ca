"""What a visual token budget keeps, and the bounded metric label it is counted under.

Engine-free: the plugin's processor (the placeholders it emits, the usage it reports), the FLOPs
model and the tests share this one definition. The budget itself is validated in
`idselect.options`.
"""

from __future__ import annotations

# Upper edges of the label buckets; anything larger (but still pruning) is ">192".
_BUCKET_EDGES = (16, 64, 192)
BUDGET_BUCKETS = ("full", *(f"<={e}" for e in _BUCKET_EDGES), f">{_BUCKET_EDGES[-1]}")


def kept_count(budget: int | None, full: int, selectable: int | None = None) -> int | None:
    """Tokens an image of `full` tokens keeps under `budget`; None when it is served unpruned
    (no budget, or one that covers the whole image). `selectable`: of the full tokens, those
    selection chooses from (the rest are structure, e.g. LLaVA-NeXT's row newlines, dropped
    when the image is pruned); all of them by default."""
    if budget is None or budget >= full:
        return None
    return min(budget, full if selectable is None else selectable)


def budget_bucket(budget: int | None, full: int | None = None) -> str:
    """Map a budget to one of BUDGET_BUCKETS, so metric label values stay bounded."""
    if budget is None or (full is not None and budget >= full):
        return "full"
    for edge in _BUCKET_EDGES:
        if budget <= edge:
            return f"<={edge}"
    return f">{_BUCKET_EDGES[-1]}"
