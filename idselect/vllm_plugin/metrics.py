"""Prometheus metrics the plugin records.

Counters are incremented where requests are processed (the API process) and the selection
histogram where selection runs (the model worker). Both only add up on one `/metrics` page when
PROMETHEUS_MULTIPROC_DIR is set before any process starts (the server does this); without it each
process keeps its own values, which is what offline `vllm.LLM` users get.

The metric objects are created on first use, not at import: prometheus_client decides between its
in-memory and multiprocess value stores when a metric is created, from the environment of that
moment.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from prometheus_client import Counter, Histogram

from idselect.budget import BUDGET_BUCKETS
from idselect.options import SELECTORS

# Seconds; selection on CPU is sub-millisecond to tens of milliseconds per image.
_SELECTION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)


class _Metrics:
    def __init__(self) -> None:
        self.images = Counter(
            "idselect_images",
            "Images processed, by bucketed visual token budget.",
            ["budget"],
        )
        self.tokens_original = Counter(
            "idselect_visual_tokens_original",
            "Visual tokens the images would have cost without selection.",
            ["budget"],
        )
        self.tokens_kept = Counter(
            "idselect_visual_tokens_kept",
            "Visual tokens kept by ID-Selection and prefilled by the language model.",
            ["budget"],
        )
        self.selection_seconds = Histogram(
            "idselect_selection_seconds",
            "Per-image time spent scoring and selecting visual tokens in the embedding step, "
            "by selector.",
            ["selector"],
            buckets=_SELECTION_BUCKETS,
        )
        for selector in SELECTORS:
            self.selection_seconds.labels(selector)
        for bucket in BUDGET_BUCKETS:  # export zeros so rate() works from the first scrape
            self.images.labels(bucket)
            self.tokens_original.labels(bucket)
            self.tokens_kept.labels(bucket)


@cache
def metrics() -> _Metrics:
    return _Metrics()


def record_image(bucket: str, original: int, kept: int) -> None:
    m = metrics()
    m.images.labels(bucket).inc()
    m.tokens_original.labels(bucket).inc(original)
    m.tokens_kept.labels(bucket).inc(kept)


@contextmanager
def timed_selection(
    device: torch.device, images: int, selector: str = "id_select"
) -> Iterator[None]:
    """Observe the enclosed scoring + selection time, split evenly over `images` images.

    On CUDA the time is the GPU's, between two events on the current stream: it leaves out the
    vision tower still queued before them, and the only host sync is waiting for the end event.
    """
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        started = time.perf_counter()
        yield
        seconds = time.perf_counter() - started
    histogram = metrics().selection_seconds.labels(selector)
    for _ in range(images):
        histogram.observe(seconds / images)
