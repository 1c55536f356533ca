"""The soak's CI mode: ~60 s of 6 concurrent clients with mixed budgets (absent, null and
1..10**6), streamed and not, data: and http images, against one real server.

Zero 5xx, every response's prompt tokens exactly right for its own budget, and the server's RSS
reported at the start and end (printed; only loosely checked). The long mode is
`python -m benchmarks.soak --duration 600` (see docs/robustness.md). IDSELECT_SOAK_SECONDS and
IDSELECT_SOAK_CLIENTS change the CI mode's length and width.
"""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from benchmarks.soak import soak
from devtools.media_server import media_server
from tests.conftest import make_image
from tests.robust_helpers import metric_total
from tests.server_harness import EAGER, tiny_server

pytestmark = pytest.mark.engine

DEFAULT_BUDGET = 32
SECONDS = float(os.environ.get("IDSELECT_SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("IDSELECT_SOAK_CLIENTS", "6"))


@pytest.fixture(scope="module")
def loopback():
    with media_server(make_image(31)) as server:
        yield server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    # localhost is allow-listed, so the http images below take the guarded fetch path.
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("logs"),
                     "--visual-token-budget", str(DEFAULT_BUDGET),
                     "--allowed-media-domains", "localhost", *EAGER) as s:
        yield s


def test_soak_mixed_budgets_concurrent_clients(server, loopback, tiny_model_dir):
    report = asyncio.run(soak(
        server.base_url, tiny_model_dir, duration_s=SECONDS, clients=CLIENTS,
        server_pid=server.process.pid, default_budget=DEFAULT_BUDGET,
        extra_images=[loopback.url("/img.png", host="localhost")],
    ))
    print("\n" + report.summary() + "\n" + report.rss_trace())
    assert report.server_errors == 0, report.statuses
    assert report.mismatches == [], report.mismatches[:10]
    assert report.errors == [], report.errors[:10]
    assert set(report.statuses) == {200}, report.statuses
    assert report.requests >= CLIENTS * 5, report.summary()
    assert len(report.by_budget) >= 8, report.by_budget  # the mix really was mixed
    assert loopback.hits, "no http image was fetched through the allow-list"
    # Loose sanity only: caches fill during a soak, but the footprint must not run away.
    assert report.rss_start and report.rss_end
    assert report.rss_end < 2 * report.rss_start + 2**30, report.summary()

    page = httpx.get(server.base_url + "/metrics", timeout=30).text
    assert metric_total(page, "vllm:num_requests_running") == 0
    assert metric_total(page, "vllm:num_requests_waiting") == 0
    assert httpx.get(server.base_url + "/health", timeout=10).status_code == 200
