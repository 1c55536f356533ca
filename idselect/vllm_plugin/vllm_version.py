"""The vLLM release idselect's workarounds on vLLM internals were checked against."""

from __future__ import annotations

import vllm

CHECKED = "0.32."


def require_checked_vllm(workaround: str) -> None:
    """Refuse to apply a workaround (named by its file) on a vLLM it was not checked against."""
    if not vllm.__version__.startswith(CHECKED):
        raise RuntimeError(
            f"{workaround} works around vLLM {CHECKED}x internals and this is vLLM "
            f"{vllm.__version__}: check it against this release before serving"
        )
