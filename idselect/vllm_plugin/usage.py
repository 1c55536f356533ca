"""One request's idselect state, shared by the HTTP layer and the multimodal processor.

Inside `idselect serve`, the HTTP layer validates a request's options once and opens a
`request(options)` scope around it; the processor runs in the same process, on vLLM's processing
thread (`compat.propagate_to_processing` carries the scope there), and:

- takes the options from the scope instead of parsing the request's `mm_processor_kwargs` again
  (they are still there, for vLLM's cache hashes);
- reports what it decided for each image (`report`): its placeholder counts, known exactly there
  for every architecture and image size. The response's `usage` and the `/metrics` counters are
  both made from that report, so they agree by construction.

Offline (`vllm.LLM`) and on vLLM's other endpoints there is no scope: the processor is where the
options enter, so it parses them, and images are counted on the metrics directly.
A request processed more than once (a retried render) reports its last processing.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from idselect.budget import budget_bucket
from idselect.options import VisualOptions
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


@dataclass
class RequestScope:
    """One HTTP request: its options as the edge validated them (deployment defaults not yet
    applied), and what the processor did with them."""

    options: VisualOptions = field(default_factory=VisualOptions)
    usage: VisualUsage = field(default_factory=VisualUsage)
    # The options the processor served the images with (defaults applied); None until it ran.
    served: VisualOptions | None = None

    def label(self) -> str:
        """The request's bounded budget label: "full" when no image was pruned, else the bucket
        of the budget the processor pruned with (or, before it ran, the one the client sent)."""
        if self.usage.pruned():
            return budget_bucket((self.served or self.options).budget)
        return "full" if self.usage.images else budget_bucket(self.options.budget)


_current: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar(
    "idselect_http_request", default=None
)
# Set by `idselect serve` in its API process: processing outside a request scope (vLLM's
# /tokenize, warm-up) is not traffic there, and requests are counted by the HTTP layer.
_counted_by_http = False


@contextmanager
def request(options: VisualOptions | None = None) -> Iterator[RequestScope]:
    """Scope of one HTTP request whose options the edge validated."""
    scope = RequestScope(options or VisualOptions())
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)


def current() -> RequestScope | None:
    return _current.get()


def count_in_http_layer() -> None:
    global _counted_by_http
    _counted_by_http = True


def report(images: list[ImageUsage], served: VisualOptions | None = None) -> None:
    """Called by the processor for each processed prompt (profiling excluded)."""
    scope = _current.get()
    if scope is not None:
        scope.usage.images = list(images)
        scope.served = served
    elif not _counted_by_http:
        VisualUsage(list(images)).count()
