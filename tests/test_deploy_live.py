"""Live: the server on the tiny model, a real Prometheus scraping it, the dashboard's PromQL.

One `idselect serve` subprocess (CPU engine, ~40 s to start on 2 cores) and one Prometheus on
127.0.0.1 with free ports, a temporary config (scrape_interval 1s) and its own storage directory:
never the system Prometheus the Debian package may run. After chat requests with images and the
budgets 16, 64 and none (plain and streamed, plus one invalid budget for a 4xx), every PromQL
expression of docker/grafana/dashboards/idselect.json (Grafana variables substituted) must return
a non-empty result from Prometheus' HTTP API, and the dashboard's `job` variable must list the job.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_image
from tests.robust_helpers import wait_until
from tests.test_deploy_static import (
    dashboard,
    dashboard_queries,
    require_tool,
    substitute_grafana_variables,
)

pytestmark = pytest.mark.engine

API_KEY = "live-test-key"
JOB = "idselect"
SERVER_START_TIMEOUT = 300  # seconds; ~40 s on 2 CPU cores
FULL_TOKENS = 576  # CLIP ViT-L/14 at 336 px, the tiny model's geometry


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no log)"
    return text[-chars:]


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """End a process we started in its own session, with everything it spawned."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{what} not ready after {timeout:.0f} s ({url}):\n{_tail(log)}", pytrace=False)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    exe = Path(sys.executable).parent / "idselect"
    if not exe.exists():
        pytest.fail(
            f"{exe} missing: install the package (bash scripts/setup-venv.sh)", pytrace=False
        )
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ)
    # The server sets up its own multiprocess metrics directory (as in a container); do not hand
    # it the one conftest created for in-process engines of other test modules.
    for name in ("PROMETHEUS_MULTIPROC_DIR", "IDSELECT_API_KEY", "IDSELECT_VISUAL_TOKEN_BUDGET"):
        env.pop(name, None)
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"
    cmd = [
        str(exe), "serve", str(tiny_model_dir),
        "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048",
        "--api-key", API_KEY,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        _wait_http(
            f"http://127.0.0.1:{port}/health", proc, log, SERVER_START_TIMEOUT, "idselect serve"
        )
        yield {"port": port, "log": log, "proc": proc}
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory):
    exe = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(
        "global:\n"
        "  scrape_interval: 1s\n"
        "  scrape_timeout: 1s\n"
        "  evaluation_interval: 1s\n"
        "scrape_configs:\n"
        f"  - job_name: {JOB}\n"
        "    metrics_path: /metrics\n"
        "    static_configs:\n"
        f"      - targets: ['127.0.0.1:{server['port']}']\n"
    )
    port = _free_port()
    log = workdir / "prometheus.log"
    cmd = [
        exe,
        f"--config.file={config}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1h",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(f"{url}/-/ready", proc, log, 60, "prometheus")
        yield {"url": url, "log": log}
    finally:
        _stop(proc)


def _query(prom: dict, expr: str) -> list:
    resp = httpx.get(f"{prom['url']}/api/v1/query", params={"query": expr}, timeout=10)
    body = resp.json()
    assert resp.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
    data = body["data"]
    if data["resultType"] in ("scalar", "string"):
        return [data["result"]]
    return data["result"]


def _image_url(seed: int) -> str:
    buf = io.BytesIO()
    make_image(seed, (336, 336)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def traffic(server, prometheus):
    """Chat requests with budgets 16, 64 and none, plain and streamed, and one invalid budget."""
    import openai

    base = f"http://127.0.0.1:{server['port']}"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    ok = 0
    for seed, budget in enumerate([16, 64, None, 16, 64, None]):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _image_url(seed)}},
                    {"type": "text", "text": "What is in the image?"},
                ],
            }
        ]
        extra = {"visual_token_budget": budget} if budget is not None else None
        if seed < 3:
            resp = client.chat.completions.create(
                model=model, messages=messages, max_tokens=4, temperature=0, extra_body=extra
            )
            assert resp.choices, resp
        else:
            stream = client.chat.completions.create(
                model=model,
                messages=messages,
                max_tokens=4,
                temperature=0,
                extra_body=extra,
                stream=True,
            )
            assert list(stream)
        ok += 1
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body={"visual_token_budget": 0},
        )
    # /v1 needs the key, /metrics (scraped by Prometheus without one) does not.
    assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
    assert httpx.get(f"{base}/metrics", timeout=10).status_code == 200

    # Wait until Prometheus has scraped the finished requests, then two more scrapes so that
    # rate() has samples on both sides.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = _query(prometheus, f'sum(idselect_requests_total{{job="{JOB}",code="2xx"}})')
        if result and float(result[0]["value"][1]) >= ok:
            break
        time.sleep(1)
    else:
        pytest.fail(
            f"Prometheus never saw {ok} successful requests; server log:\n{_tail(server['log'])}"
        )
    # Two more scrapes, so that rate() has samples on both sides of the traffic.
    samples = f'count_over_time(up{{job="{JOB}"}}[10m])'
    seen = float(_query(prometheus, samples)[0]["value"][1])
    wait_until(lambda: float(_query(prometheus, samples)[0]["value"][1]) >= seen + 2, 60,
               "two more scrapes")
    return {"ok": ok}


def test_prometheus_scrapes_the_server(prometheus, traffic):
    up = _query(prometheus, f'up{{job="{JOB}"}}')
    assert up and up[0]["value"][1] == "1", up


def _by_budget(prom: dict, metric: str) -> dict[str, float]:
    return {
        r["metric"]["budget"]: float(r["value"][1])
        for r in _query(prom, f'sum by (budget) ({metric}{{job="{JOB}"}})')
    }


def test_budget_buckets_and_savings(prometheus, traffic):
    images = _by_budget(prometheus, "idselect_images_total")
    for bucket in ("<=16", "<=64", "full"):
        assert images.get(bucket, 0) >= 2, images
    kept = _by_budget(prometheus, "idselect_visual_tokens_kept_total")
    original = _by_budget(prometheus, "idselect_visual_tokens_original_total")
    assert kept["<=16"] < kept["<=64"] < original["<=64"], (kept, original)
    assert kept["full"] == original["full"] == images["full"] * FULL_TOKENS, (kept, original)


def test_every_dashboard_query_returns_data(prometheus, traffic):
    queries = [
        (where, substitute_grafana_variables(expr))
        for where, expr in dashboard_queries(dashboard())
    ]
    assert len(queries) >= 15
    empty: list[str] = []
    deadline = time.monotonic() + 30
    while True:
        empty = [f"{where}: {expr}" for where, expr in queries if not _query(prometheus, expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_dashboard_job_variable_lists_the_job(prometheus, traffic):
    (variable,) = [v for v in dashboard()["templating"]["list"] if v["name"] == "job"]
    # label_values(<metric>, <label>), as Grafana's Prometheus datasource evaluates it.
    metric, label = variable["definition"].removeprefix("label_values(").rstrip(")").split(", ")
    resp = httpx.get(
        f"{prometheus['url']}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10
    )
    assert JOB in resp.json()["data"], resp.text
