"""What the multimodal processor decided for each image of a request: the visual usage.

The processor (front-end process) is where a request's images get their placeholder counts, so it
is where the usage is known exactly, for every architecture and image size. It reports each
processed prompt's images here:

- inside `idselect serve`, the HTTP layer opened a `collect()` scope around the request: the
  images go to that request's `VisualUsage`, which the response's `usage` and the `/metrics`
  counters are both made from (so they agree by construction);
- offline (`vllm.LLM`), there is no HTTP layer: the images are counted on the metrics directly.

A request processed more than once (a retried render) reports its last processing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from idselect.vllm_plugin import metrics


@dataclass(frozen=True)
class ImageUsage:
    original: int  # tokens the image costs unpruned (vLLM's stock count)
    kept: int  # tokens the language model prefills for it
    bucket: str  # the bounded budget label it is counted under


@dataclass
class VisualUsage:
    """One request's images, as the processor reported them."""

    images: list[ImageUsage] = field(default_factory=list)

    @property
    def original(self) -> int:
        return sum(i.original for i in self.images)

    @property
    def kept(self) -> int:
        return sum(i.kept for i in self.images)

    def as_usage(self) -> dict[str, int]:
        """The fields added to an OpenAI `usage` object."""
        return {"visual_tokens_original": self.original, "visual_tokens_kept": self.kept}

    def pruned(self) -> bool:
        return any(i.kept < i.original for i in self.images)

    def count(self) -> None:
        """Add these images to the `/metrics` counters."""
        for image in self.images:
            metrics.record_image(image.bucket, image.original, image.kept)


_current: contextvars.ContextVar[VisualUsage | None] = contextvars.ContextVar(
    "idselect_visual_usage", default=None
)
# Set by `idselect serve` in its API process: processing outside a request scope (vLLM's
# /tokenize, warm-up) is not traffic there, and requests are counted by the HTTP layer.
_counted_by_http = False


@contextmanager
def collect() -> Iterator[VisualUsage]:
    """Scope of one HTTP request: what its processing reports lands in the yielded value."""
    usage = VisualUsage()
    token = _current.set(usage)
    try:
        yield usage
    finally:
        _current.reset(token)


def count_in_http_layer() -> None:
    global _counted_by_http
    _counted_by_http = True


def report(images: list[ImageUsage]) -> None:
    """Called by the processor for each processed prompt (profiling excluded)."""
    usage = _current.get()
    if usage is not None:
        usage.images = list(images)
    elif not _counted_by_http:
        VisualUsage(list(images)).count()
