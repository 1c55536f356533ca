"""atheris (coverage-guided, libFuzzer) targets for the pure-Python edge code that reads client
values: the request options path (`server.request.openai_rules`, `server.request.options`,
the budget and importance validators), the media URL policy (`server.media_policy`) and the
inline-image checks (`server.media_fetch`: data: URLs and image headers).

Each target may only raise the refusal its code documents (RequestRejected, MediaRefused); any
other exception, or a broken invariant, is a crash. Run one target:

    .venv/bin/python -m tests.edge_fuzz_targets TARGET [libFuzzer options, e.g. -runs=20000 -seed=1]

`tests/test_edge_fuzz.py` runs every target briefly, seeded, in CI; crashes found become
regression cases there.
"""

from __future__ import annotations

import ipaddress
import json
import math
import sys
import warnings
from typing import Any

import atheris

# Third-party modules are imported first so that only our own modules get instrumented.
import PIL.Image

with atheris.instrument_imports(include=["server", "idselect"]):
    from idselect.options import BUDGET_KEY, IMPORTANCE_KEY, IMPORTANCE_NAMES, OPTION_KEYS
    from server.media_policy import (
        MediaPolicy,
        MediaRefused,
        address_refusal,
        check_url,
    )
    from server.request.openai_rules import check_chat_request, check_completion_request
    from server.request.options import RequestRejected, prepare
    from server.settings import ServerSettings

# PIL warns above its own default limit; check_pixels' own limits are what is under test.
warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
SETTINGS = (ServerSettings(), ServerSettings(trust_all_mm_kwargs=True))
POLICIES = (
    MediaPolicy(),
    MediaPolicy(allowed_domains=("images.example.com", "10.0.0.5")),
    MediaPolicy(allow_private=True),
)
_KEYS = (BUDGET_KEY, IMPORTANCE_KEY, "mm_processor_kwargs", "media_io_kwargs", "messages", "n",
         "logit_bias", "modalities", "audio", "web_search_options", "stream", "model",
         "add_generation_prompt", "role", "content", "type", "image_url", "url", "text",
         "tool_call_id", "name")
_STRINGS = ("visual", "cls", "text", "unified", "user", "system", "assistant", "tool", "function",
            "developer", "image_url", "input_audio", "file", "refusal", "16", "")


def _value(fdp: atheris.FuzzedDataProvider, depth: int = 0) -> Any:
    """An arbitrary JSON value, biased towards the keys and words the code looks at."""
    kind = fdp.ConsumeIntInRange(0, 11 if depth < 4 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-3, 1000)
    if kind == 3:
        return fdp.ConsumeInt(fdp.ConsumeIntInRange(1, 64))  # up to 2**512
    if kind == 4:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind == 5:
        return _STRINGS[fdp.ConsumeIntInRange(0, len(_STRINGS) - 1)]
    if kind in (6, 7):
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    if kind in (8, 9):
        return [_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    return _object(fdp, depth + 1)


def _object(fdp: atheris.FuzzedDataProvider, depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        key = (_KEYS[fdp.ConsumeIntInRange(0, len(_KEYS) - 1)] if fdp.ConsumeBool()
               else fdp.ConsumeUnicodeNoSurrogates(6))
        out[key] = _value(fdp, depth)
    return out


def request_options(data: bytes) -> None:
    """A structured body through the rules and the budget/importance rewrite."""
    fdp = atheris.FuzzedDataProvider(data)
    settings = SETTINGS[fdp.ConsumeIntInRange(0, len(SETTINGS) - 1)]
    chat = fdp.ConsumeBool()
    body = _object(fdp, 0)
    if fdp.ConsumeBool():
        body["messages"] = [_object(fdp, 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    _check_request(body, settings, chat)


def json_body(data: bytes) -> None:
    """Raw bytes as the budget layer reads them: JSON first, then the same path.

    The last byte picks the settings and the endpoint, the rest is the body (seedable with
    real request bodies)."""
    if not data:
        return
    settings = SETTINGS[data[-1] % len(SETTINGS)]
    chat = bool(data[-1] & 0x80)
    try:
        body = json.loads(data[:-1])
    except (ValueError, RecursionError):
        return
    if isinstance(body, dict):
        _check_request(body, settings, chat)
    else:
        assert prepare(body, settings) is None


def _check_request(body: dict[str, Any], settings: ServerSettings, chat: bool) -> None:
    try:
        (check_chat_request if chat else check_completion_request)(body)
        request = prepare(body, settings, chat=chat)
    except RequestRejected as exc:
        assert exc.param is None or (isinstance(exc.param, str) and exc.param), exc.param
        assert isinstance(str(exc), str) and len(str(exc)) < 2000
        return
    assert request is not None
    rewritten = request.body
    assert not set(OPTION_KEYS) & set(rewritten)
    json.dumps(rewritten)  # what the budget layer sends on
    mm = rewritten.get("mm_processor_kwargs")
    if mm is not None and not settings.trust_all_mm_kwargs:
        assert set(mm) <= set(OPTION_KEYS), mm
    budget = request.options.budget
    assert budget is None or (type(budget) is int and budget >= 1), budget
    assert request.options.importance in (None, *IMPORTANCE_NAMES), request.options
    # What the processor receives, kwargs and typed value alike, is the same options.
    assert {k: v for k, v in (mm or {}).items() if k in OPTION_KEYS} == request.options.as_kwargs()


_SCHEMES = ("http", "https", "HTTP", "ftp", "file", "data", "gopher", "")
_NAMES = ("example.com", "images.example.com", "IMAGES.example.com.", "localhost", "10.0.0.5",
          "0x7f.1", "2130706433", "127.1", "0177.0.0.1", "", "[", "[::1", "xn--", "a" * 300)


def media_url(data: bytes) -> None:
    """A URL from parts (scheme, credentials, host in many spellings, port, path) or raw text."""
    fdp = atheris.FuzzedDataProvider(data)
    policy = POLICIES[fdp.ConsumeIntInRange(0, len(POLICIES) - 1)]
    if fdp.ConsumeBool():
        url = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 120))
    else:
        scheme = _SCHEMES[fdp.ConsumeIntInRange(0, len(_SCHEMES) - 1)]
        userinfo = ("", "user@", "user:pw@", ":@", "@")[fdp.ConsumeIntInRange(0, 4)]
        host_kind = fdp.ConsumeIntInRange(0, 3)
        if host_kind == 0:
            host = str(ipaddress.IPv4Address(fdp.ConsumeIntInRange(0, 2**32 - 1)))
        elif host_kind == 1:
            ip6 = ipaddress.IPv6Address(fdp.ConsumeIntInRange(0, 2**128 - 1))
            zone = ("", "%eth0", "%25", "%")[fdp.ConsumeIntInRange(0, 3)]
            host = f"[{ip6}{zone}]"
        elif host_kind == 2:
            host = _NAMES[fdp.ConsumeIntInRange(0, len(_NAMES) - 1)]
        else:
            host = fdp.ConsumeUnicode(fdp.ConsumeIntInRange(0, 20))
        port = ("", ":80", ":0", ":99999", ":-1", ":x", ":")[fdp.ConsumeIntInRange(0, 6)]
        url = f"{scheme}://{userinfo}{host}{port}/" + fdp.ConsumeUnicode(8)
    try:
        host = check_url(url, policy)
    except MediaRefused as exc:
        assert str(exc)
        return
    assert isinstance(host, str) and host
    assert url.split(":", 1)[0].lower() in ("http", "https"), url
    try:
        literal = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return
    if not policy.allow_private and not policy.trusts(host):
        assert address_refusal(literal) is None, url
        assert literal.is_global and not literal.is_loopback, url


def address(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    v6 = fdp.ConsumeBool()
    trusted = fdp.ConsumeBool()
    raw = fdp.ConsumeBytes(16 if v6 else 4)
    if len(raw) < (16 if v6 else 4):
        return
    ip = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
    reason = address_refusal(ip, trusted=trusted)
    if ip.is_link_local:
        assert reason is not None, ip
    if reason is None and not trusted:
        assert ip.is_global and not (ip.is_loopback or ip.is_multicast or ip.is_private), ip


def inline_image(data: bytes) -> None:
    """data: URL decoding and the header pixel check. The first byte picks the mode and the
    limits; the rest is the image (or the data URL's text), so real images seed it."""
    if not data:
        return
    mode, rest = data[0], data[1:]
    limit = (1, 1_000_000, 50_000_000, 2**62)[mode & 3]
    policy = MediaPolicy(max_image_bytes=(16, 4096, 20 * 2**20, 2**62)[(mode >> 2) & 3])
    if mode & 0x10:
        spec = ("image/png;base64", "image/png", ";base64", "", "image/png;BASE64", "x,y")[
            (mode >> 5) % 6]
        url = f"data:{spec}," + rest.decode("latin-1")
        try:
            payload = _data_url_bytes(url, policy)
        except MediaRefused:
            return
        assert len(payload) <= math.ceil(len(url) * 3 / 4)
    else:
        payload = rest
    try:
        check_pixels(payload, limit)
    except MediaRefused as exc:
        assert "pixels" in str(exc)


def _load_media_checks() -> None:
    """server.media_fetch imports vLLM (seconds): only for the target that needs it."""
    global _data_url_bytes, check_pixels
    import pybase64  # noqa: F401
    import vllm.multimodal.media  # noqa: F401

    with atheris.instrument_imports(include=["server.media_fetch"]):
        from server.media_fetch import _data_url_bytes, check_pixels


def harness_selftest(data: bytes) -> None:
    """Crashes on its seed: proves a crash fails the run (tests/test_edge_fuzz.py)."""
    if data.startswith(b"crash"):
        raise RuntimeError("harness self-test crash")


def seed_corpus(target: str) -> list[bytes]:
    """Valid inputs to start from, for the targets that read raw bytes."""
    import base64
    import io

    from PIL import Image

    images = []
    for fmt, size in (("PNG", (4, 3)), ("JPEG", (8, 8)), ("GIF", (2, 2)), ("BMP", (3, 3)),
                      ("WEBP", (5, 5)), ("TIFF", (2, 2))):
        buf = io.BytesIO()
        Image.new("RGB", size, (10, 20, 30)).save(buf, format=fmt)
        images.append(buf.getvalue())
    if target == "harness_selftest":
        return [b"crash"]
    if target == "inline_image":
        return ([bytes([m]) + i for i in images for m in (0x00, 0x0A)]
                + [bytes([0x1A]) + base64.b64encode(i) for i in images])
    if target == "json_body":
        image = "data:image/png;base64," + base64.b64encode(images[0]).decode()
        bodies = [
            {"model": "m", "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "hi"}]}], BUDGET_KEY: 16, IMPORTANCE_KEY: "cls"},
            {"model": "m", "prompt": "hi", "n": 2, "logit_bias": {"5": 10},
             "mm_processor_kwargs": {BUDGET_KEY: 8}},
            {"messages": [{"role": "tool", "tool_call_id": "x", "content": "r"},
                          {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}],
             "add_generation_prompt": False, "modalities": ["text"]},
        ]
        return [json.dumps(b).encode() + bytes([t]) for b in bodies for t in (0x00, 0x81)]
    return []


TARGETS = {f.__name__: f for f in (request_options, json_body, media_url, address, inline_image)}
SELFTEST = {"harness_selftest": harness_selftest}


def main(argv: list[str]) -> None:
    """`TARGET [CORPUS_DIR ...] [-libfuzzer options]`; an empty CORPUS_DIR gets the seeds."""
    from pathlib import Path

    name, rest = argv[1], argv[2:]
    if name == "inline_image":
        _load_media_checks()
    for arg in rest:
        directory = Path(arg)
        if not arg.startswith("-") and directory.is_dir() and not any(directory.iterdir()):
            for i, seed in enumerate(seed_corpus(name)):
                (directory / f"seed-{i}").write_bytes(seed)
    atheris.Setup([argv[0], *rest], {**TARGETS, **SELFTEST}[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
