"""Which importance score ranks an image's tokens: the request option and its validation.

- `cls`: [CLS]->patch attention of the vision tower's feature layer (visual saliency; default).
- `text`: cosine between each projected visual token and the prompt's token embeddings from the
  language model's input embedding table. A pre-LLM approximation of the paper's cross-modal
  score: inside the image-embedding step the LLM has not run, so no text-to-image attention exists.
- `unified`: the mean of the two, each min-max normalised per image.
"""

from __future__ import annotations

from typing import Literal

from idselect.budget import BudgetError

IMPORTANCE_KEY = "visual_token_importance"
IMPORTANCE_SOURCES: tuple[str, ...] = ("cls", "text", "unified")
ImportanceSource = Literal["cls", "text", "unified"]


class ImportanceError(BudgetError):
    """A client-supplied importance source is invalid; the message names the parameter."""

    param = IMPORTANCE_KEY


def validate_importance(value: object) -> ImportanceSource | None:
    """The source name, or None when not given (the deployment default applies)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in IMPORTANCE_SOURCES:
        raise ImportanceError(
            f"{IMPORTANCE_KEY} must be one of {', '.join(IMPORTANCE_SOURCES)} or null, "
            f"got {value!r:.40}"
        )
    return value  # type: ignore[return-value]
