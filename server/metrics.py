"""Per-request metrics of the HTTP layer, labelled by bucketed budget and status class.

Label values come only from fixed sets (never from client strings). Created on first use, after
the CLI has chosen prometheus_client's multiprocess mode.
"""

from __future__ import annotations

from functools import cache

from prometheus_client import Counter, Histogram

from idselect.budget import BUDGET_BUCKETS

BUDGET_LABELS = (*BUDGET_BUCKETS, "invalid")
CODE_LABELS = ("2xx", "4xx", "5xx")
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class _RequestMetrics:
    def __init__(self) -> None:
        self.requests = Counter(
            "idselect_requests",
            "Completion requests, by bucketed visual token budget and status class.",
            ["budget", "code"],
        )
        self.duration = Histogram(
            "idselect_request_duration_seconds",
            "End-to-end completion request latency, by bucketed budget.",
            ["budget"],
            buckets=_LATENCY_BUCKETS,
        )
        self.ttft = Histogram(
            "idselect_time_to_first_token_seconds",
            "Time to the first streamed chunk (streaming requests), by bucketed budget.",
            ["budget"],
            buckets=_LATENCY_BUCKETS,
        )
        for budget in BUDGET_LABELS:
            for code in CODE_LABELS:
                self.requests.labels(budget, code)


@cache
def request_metrics() -> _RequestMetrics:
    return _RequestMetrics()


def code_class(status: int) -> str:
    return "2xx" if status < 400 else "4xx" if status < 500 else "5xx"
