"""Hostile and malformed requests against the real server: a table of bad inputs, SSRF URLs,
key hygiene and bounded metric labels. One server for the module.

Every bad request must get a 4xx in OpenAI's error shape with a useful message; after each one
the server must still be healthy and answer a valid request with the exact prompt size.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.soak import text_token_counter
from devtools.media_server import METADATA_URL, bomb_png, media_server, png_bytes
from server.metrics import BUDGET_LABELS, CODE_LABELS
from tests.conftest import make_image
from tests.robust_helpers import assert_openai_error
from tests.server_harness import EAGER, tiny_server

pytestmark = pytest.mark.engine

KEY = "hostile-key-7f3a9c"
WRONG_KEY = "not-the-key-5b1e"
FULL = 576
QUESTION = "What is in the image?"
MAX_BODY = 4 * 1024 * 1024
SERVER_ARGS = (
    "--api-key", KEY, "--limit-mm-per-prompt", '{"image": 2}',
    "--max-request-bytes", str(MAX_BODY), "--max-image-pixels", "1000000",
    "--max-image-bytes", "2000000",
)


@pytest.fixture(scope="module")
def loopback():
    with media_server(make_image(21)) as server:
        yield server


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with tiny_server(tiny_model_dir, tmp_path_factory.mktemp("logs"), *SERVER_ARGS, *EAGER) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.base_url, headers=headers, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def ctx(http, loopback, tiny_model_dir):
    return Ctx(http.get("/v1/models").json()["data"][0]["id"], loopback.port,
               text_token_counter(tiny_model_dir))


@dataclass
class Ctx:
    model: str
    port: int
    text_tokens: Callable[[str, int], int]


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64," + base64.b64encode(data).decode()


GOOD_IMAGE = data_url(png_bytes(make_image(22)))


def chat(c: Ctx, *urls: str, **extra: Any) -> dict:
    """A chat request with the given image URLs (one good image if none)."""
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in (urls or (GOOD_IMAGE,))]
    return {"model": c.model, "max_tokens": 1,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]}],
            **extra}


def with_messages(c: Ctx, messages: Any) -> dict:
    return {"model": c.model, "max_tokens": 1, "messages": messages}


def noise_png(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(pixels))


def loop(c: Ctx, path: str, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{c.port}{path}"


@dataclass
class Case:
    id: str
    body: Callable[[Ctx], Any] | None = None  # JSON-encoded (NaN allowed)
    raw: Callable[[Ctx], bytes] | None = None  # sent as is
    status: int = 400
    param: str | None = None
    says: str = ""  # a substring the message must contain (case-insensitive)
    headers: dict[str, str] = field(default_factory=dict)
    path: str = "/v1/chat/completions"


B = "visual_token_budget"
CASES = [
    # -- budgets of every wrong type and range
    *(Case(f"budget={v!r}", lambda c, v=v: chat(c, visual_token_budget=v), param=B, says=B)
      for v in (0, -1, -(10**20), 1.5, 16.0, 1e3, "16", "", "full", True, False, [16], {"k": 16},
                float("nan"), float("inf"), float("-inf"))),
    Case("budget=0 in mm_processor_kwargs",
         lambda c: chat(c, mm_processor_kwargs={B: 0}), param=f"mm_processor_kwargs.{B}", says=B),
    Case("budget given twice, different", lambda c: chat(
        c, visual_token_budget=16, mm_processor_kwargs={B: 32}), param=B, says="twice"),
    Case("foreign mm_processor_kwargs", lambda c: chat(c, mm_processor_kwargs={"do_resize": 0}),
         param="mm_processor_kwargs", says="may only contain"),
    Case("media_io_kwargs", lambda c: chat(c, media_io_kwargs={"image": {"mode": "L"}}),
         param="media_io_kwargs", says="media_io_kwargs"),
    Case("budget with 5000 digits", raw=lambda c: json.dumps(chat(c)).replace(
        '"max_tokens": 1', '"max_tokens": 1, "visual_token_budget": ' + "7" * 5000).encode(),
         says="JSON"),
    # -- the body itself
    Case("invalid JSON", raw=lambda c: b'{"model": "x", messages: [}', says="JSON"),
    Case("empty body", raw=lambda c: b"", says="JSON"),
    Case("JSON nested 100000 deep", raw=lambda c: b"[" * 100_000 + b"]" * 100_000,
         says="nested"),
    Case("not UTF-8", raw=lambda c: b'{"model": "\xff\xfe\xfd"}', says="JSON"),
    Case("JSON array body", body=lambda c: [chat(c)]),
    Case("JSON string body", body=lambda c: "hello"),
    Case("wrong content type", raw=lambda c: json.dumps(chat(c)).encode(),
         headers={"content-type": "text/plain"}, says="application/json"),
    Case("form-encoded body", raw=lambda c: b"model=x&messages=y",
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("oversized body (413)", raw=lambda c: json.dumps(chat(c, padding="x" * MAX_BODY)).encode(),
         status=413, says="exceeds"),
    # -- schema errors
    Case("no messages", body=lambda c: {"model": c.model}, says="messages"),
    Case("messages is a string", body=lambda c: with_messages(c, "hello"), says="messages"),
    Case("message without role", body=lambda c: with_messages(c, [{"content": "hi"}])),
    Case("content is a number", body=lambda c: with_messages(c, [{"role": "user", "content": 5}])),
    Case("unknown content part", body=lambda c: with_messages(
        c, [{"role": "user", "content": [{"type": "hologram", "data": 1}]}])),
    Case("image_url without url", body=lambda c: with_messages(
        c, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])),
    Case("image_url is a number", body=lambda c: with_messages(
        c, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}])),
    Case("max_tokens negative", lambda c: chat(c, max_tokens=-1), param="max_tokens"),
    Case("max_tokens beyond the context", lambda c: chat(c, max_tokens=10**9),
         param="max_tokens"),
    Case("temperature is a word", lambda c: chat(c, temperature="hot"), says="temperature"),
    Case("stream is a word", lambda c: chat(c, stream="yes-please"), says="stream"),
    Case("unknown model", lambda c: {**chat(c), "model": "gpt-imaginary"}, status=404,
         param="model", says="does not exist"),
    Case("completions: prompt missing", body=lambda c: {"model": c.model},
         path="/v1/completions"),
    # -- images
    Case("truncated base64", lambda c: chat(c, GOOD_IMAGE[:1001]), says="base64"),
    Case("base64 of text", lambda c: chat(c, data_url(b"just some text, not an image" * 8)),
         says="image"),
    Case("not base64 at all", lambda c: chat(c, "data:image/png;base64,!!**not-base64**!!"),
         says="base64"),
    Case("data URL not base64-encoded", lambda c: chat(c, "data:image/png,rawbytes"),
         says="base64"),
    Case("GIF header, garbage body",
         lambda c: chat(c, data_url(b"GIF89a" + b"\0" * 40, "image/gif")), says="image"),
    Case("decompression bomb 100000x100000", lambda c: chat(c, data_url(bomb_png())),
         says="pixels"),
    Case("over --max-image-pixels", lambda c: chat(c, data_url(png_bytes(
        Image.new("RGB", (1001, 1000))))), says="pixels"),
    Case("over --max-image-bytes", lambda c: chat(c, data_url(noise_png(950, 950))),
         says="limit"),
    Case("three images, limit 2", lambda c: chat(c, GOOD_IMAGE, GOOD_IMAGE, GOOD_IMAGE),
         says="at most 2"),
    # -- URLs the server must not fetch (SSRF) or cannot
    Case("file:///etc/passwd", lambda c: chat(c, "file:///etc/passwd"), says="file://"),
    Case("ftp URL", lambda c: chat(c, "ftp://127.0.0.1/x.png"), says="scheme"),
    Case("gopher URL", lambda c: chat(c, "gopher://127.0.0.1:70/_x"), says="scheme"),
    Case("loopback IP", lambda c: chat(c, loop(c, "/img.png")), says="loopback"),
    Case("localhost name", lambda c: chat(c, loop(c, "/img.png", "localhost")), says="loopback"),
    Case("IPv6 loopback", lambda c: chat(c, loop(c, "/img.png", "[::1]")), says="loopback"),
    Case("IPv4-mapped loopback", lambda c: chat(c, loop(c, "/img.png", "[::ffff:127.0.0.1]")),
         says="loopback"),
    Case("decimal-encoded loopback", lambda c: chat(c, loop(c, "/img.png", "2130706433")),
         says="image"),
    Case("0.0.0.0", lambda c: chat(c, loop(c, "/img.png", "0.0.0.0")), says="address"),
    Case("cloud metadata", lambda c: chat(c, METADATA_URL), says="metadata"),
    Case("private network", lambda c: chat(c, "http://10.1.2.3/cat.png"), says="private"),
    Case("redirector on localhost", lambda c: chat(
        c, loop(c, "/redirect?to=" + METADATA_URL, "localhost")), says="loopback"),
    Case("credentials in URL", lambda c: chat(c, "http://user:pw@example.com/cat.png"),
         says="credentials"),
    # -- authentication
    Case("no API key", lambda c: chat(c), status=401, says="API key",
         headers={"authorization": ""}),
    Case("wrong API key", lambda c: chat(c), status=401, says="API key",
         headers={"authorization": f"Bearer {WRONG_KEY}"}),
]


def send(http: httpx.Client, c: Ctx, case: Case) -> httpx.Response:
    headers = {"content-type": "application/json", **case.headers}
    # json.dumps writes NaN/Infinity as such: hostile, but what some clients send
    content = case.raw(c) if case.raw is not None else json.dumps(case.body(c)).encode()
    return http.post(case.path, content=content, headers=headers)


def check_valid_request(http: httpx.Client, c: Ctx, budget: int = 16) -> None:
    response = http.post("/v1/chat/completions", json=chat(c, visual_token_budget=budget))
    assert response.status_code == 200, response.text[:500]
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] == c.text_tokens(QUESTION, 1) + min(budget, FULL)
    assert usage["visual_tokens_kept"] == min(budget, FULL)


def test_the_table_is_big_enough():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_request_is_4xx_openai_shaped_and_server_keeps_serving(http, ctx, case):
    error = assert_openai_error(send(http, ctx, case), case.status)
    if case.param is not None:
        assert error["param"] == case.param, error
    assert case.says.lower() in error["message"].lower(), error
    assert http.get("/health").status_code == 200
    check_valid_request(http, ctx)


def test_one_pixel_image_is_accepted_at_its_budget(http, ctx):
    """Decision: a 1x1 image is a valid image; the processor resizes it like any other."""
    for budget in (16, FULL):
        response = http.post("/v1/chat/completions", json=chat(
            ctx, data_url(png_bytes(Image.new("RGB", (1, 1), (200, 10, 10)))),
            visual_token_budget=budget))
        assert response.status_code == 200, response.text[:300]
        assert response.json()["usage"]["prompt_tokens"] == ctx.text_tokens(QUESTION, 1) + budget


def test_refused_urls_were_never_fetched(http, ctx, loopback):
    assert loopback.hits == []  # every loopback URL in the table was refused before connecting


def test_keys_never_reach_the_log(server, http, ctx):
    check_valid_request(http, ctx)
    log = server.log()
    assert "Application startup complete" in log
    assert KEY not in log and WRONG_KEY not in log


def test_metric_labels_stay_in_their_fixed_sets(server):
    from prometheus_client.parser import text_string_to_metric_families

    page = httpx.get(server.base_url + "/metrics", timeout=30).text
    seen = set()
    for family in text_string_to_metric_families(page):
        if not family.name.startswith("idselect_"):
            continue
        for sample in family.samples:
            if "budget" in sample.labels:
                seen.add(sample.labels["budget"])
                assert sample.labels["budget"] in BUDGET_LABELS, sample
            if "code" in sample.labels:
                assert sample.labels["code"] in CODE_LABELS, sample
    assert "invalid" in seen and "<=16" in seen


def test_vllm_error_bodies_are_mapped_to_openai_shape():
    from server.middleware.openai_errors import normalise

    vllm = {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}}
    assert normalise(400, vllm)["error"] == {
        "message": "bad", "type": "invalid_request_error", "param": None, "code": None}
    missing = {"error": {"message": "nope", "type": "NotFoundError", "param": "model",
                         "code": 404}}
    assert normalise(404, missing)["error"]["code"] == "model_not_found"
    assert normalise(503, {"error": {"message": "x", "type": "Y", "code": 503}})["error"][
        "type"] == "server_error"
    ours = {"error": {"message": "m", "type": "invalid_request_error", "param": "p",
                      "code": "invalid_value"}}
    assert normalise(400, ours) is ours
    assert normalise(400, [1, 2]) == [1, 2]


def test_key_comparison_is_vllms_constant_time_check(monkeypatch):
    """The API-key check is vLLM's own (`AuthenticationMiddleware`, at idselect's place in the
    stack): every configured key is compared, always as two 32-byte digests, whatever is
    presented."""
    import hmac
    import secrets

    from starlette.datastructures import Headers

    from idselect.vllm_plugin.compat import api_key_middleware
    from server.middleware import auth

    calls: list[tuple[int, int]] = []

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(secrets, "compare_digest", recording)
    keys = ("first-key", "second-key-which-is-longer", KEY)
    monkeypatch.setattr(auth, "_keys", keys)
    middleware = auth.ApiKeyMiddleware(app=None)
    assert isinstance(middleware, api_key_middleware()) and not middleware.open
    for presented, expected in (("", False), ("x", False), ("first-key", True),
                                ("y" * 10_000, False), (KEY, True)):
        calls.clear()
        headers = Headers({"authorization": f"Bearer {presented}"})
        assert middleware.verify_token(headers) is expected
        assert calls == [(32, 32)] * len(keys)
