"""SSRF and media limits, in-process: the policy, the pinned resolver, the guarded fetch and
vLLM's media connector subclass, against a loopback HTTP server (no vLLM engine).

Nothing here connects anywhere but 127.0.0.1: non-loopback addresses appear only as resolver
answers and redirect targets, and the tests check they are refused before any request starts.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import time
from dataclasses import replace

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver

from devtools.media_server import METADATA_URL, bomb_png, media_server, png_bytes
from server import media_fetch
from server.media_policy import MediaPolicy, MediaRefused, address_refusal, check_url
from tests.conftest import make_image

DEFAULT = MediaPolicy()
LOCALHOST_TRUSTED = MediaPolicy(allowed_domains=("localhost",), fetch_timeout_s=3)

REFUSED = [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1",
    "169.254.169.254", "169.254.170.2", "100.100.100.200", "0.0.0.0", "224.0.0.1",
    "255.255.255.255", "192.0.2.1", "::1", "::", "fe80::1", "fd00::1", "fd00:ec2::254",
    "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1",
    "2002:7f00:1::", "2001:db8::1",
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111"]


@pytest.fixture(scope="module")
def loopback():
    with media_server(make_image(11)) as server:
        yield server


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused(address):
    assert address_refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_pass(address):
    assert address_refusal(ipaddress.ip_address(address)) is None


def test_trusted_hosts_may_be_private_but_never_metadata():
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), trusted=True) is None
    assert address_refusal(ipaddress.ip_address("10.1.2.3"), trusted=True) is None
    for metadata in ("169.254.169.254", "fd00:ec2::254", "::ffff:169.254.169.254"):
        assert address_refusal(ipaddress.ip_address(metadata), trusted=True) is not None


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:70/x",
    "dict://127.0.0.1:11211/", "jar:http://x/y!/z", "//example.com/a.png", "example.com/a.png",
    "http://", "http://user:secret@example.com/a.png", "http://127.0.0.1/a.png",
    "http://[::1]:8000/", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x",
    "http://[::ffff:7f00:1]/", "http://0.0.0.0:8000/", "http://example.com:99999/",
])
def test_urls_refused_before_any_lookup(url):
    with pytest.raises(MediaRefused):
        check_url(url, DEFAULT)


def test_public_url_passes_the_static_check_and_allow_list_restricts():
    assert check_url("https://images.example.com/cat.png", DEFAULT) == "images.example.com"
    only = MediaPolicy(allowed_domains=("images.example.com",))
    assert check_url("https://IMAGES.example.com./cat.png", only)
    with pytest.raises(MediaRefused, match="allowed media domains"):
        check_url("https://other.example.com/cat.png", only)


class FakeResolver(AbstractResolver):
    """Answers from a table: stands in for DNS (including a rebinding one)."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": 0} for a in self.table[host]]

    async def close(self) -> None:
        pass


def test_resolver_refuses_a_host_when_any_answer_is_not_public():
    table = {"rebind.test": ["93.184.216.34", "169.254.169.254"], "inner.test": ["10.0.0.7"],
             "ok.test": ["93.184.216.34"], "v6.test": ["::1"]}

    async def resolve(host, policy=DEFAULT):
        return await media_fetch.GuardedResolver(policy, FakeResolver(table)).resolve(host, 80)

    for host in ("rebind.test", "inner.test", "v6.test"):
        with pytest.raises(MediaRefused, match=host):
            asyncio.run(resolve(host))
    assert [r["host"] for r in asyncio.run(resolve("ok.test"))] == ["93.184.216.34"]
    private_ok = MediaPolicy(allow_private=True)
    assert asyncio.run(resolve("inner.test", private_ok))[0]["host"] == "10.0.0.7"


def fetch(url: str, policy: MediaPolicy, started: list[str] | None = None) -> bytes:
    """media_fetch.fetch_bytes with a fresh session; records every request it starts."""

    async def run() -> bytes:
        trace = aiohttp.TraceConfig()

        async def on_start(session, context, params) -> None:
            if started is not None:
                started.append(str(params.url))

        trace.on_request_start.append(on_start)
        async with media_fetch.new_session(policy, trace_configs=[trace]) as session:
            return await media_fetch.fetch_bytes(url, policy, session)

    return asyncio.run(run())


def test_loopback_is_refused_by_default_and_never_contacted(loopback):
    before = len(loopback.hits)
    for url in (loopback.url("/img.png"), loopback.url("/img.png", host="localhost")):
        with pytest.raises(MediaRefused, match="loopback"):
            fetch(url, DEFAULT)
    # Legacy numeric spellings of 127.0.0.1: aiohttp rejects them, or they resolve to loopback.
    for host in ("2130706433", "0x7f.1", "127.1", "0177.0.0.1", "017700000001"):
        with pytest.raises(MediaRefused):
            fetch(loopback.url("/img.png", host=host), DEFAULT)
    assert len(loopback.hits) == before


def test_allow_listed_domain_is_fetched(loopback):
    data = fetch(loopback.url("/img.png", host="localhost"), LOCALHOST_TRUSTED)
    assert data == png_bytes(make_image(11))


# Even an operator who allow-lists the metadata addresses does not get them fetched.
METADATA_LISTED = replace(
    LOCALHOST_TRUSTED, allowed_domains=("localhost", "169.254.169.254", "fd00:ec2::254")
)


@pytest.mark.parametrize("target, reason", [
    (METADATA_URL, "metadata"),
    ("http://[fd00:ec2::254]/latest/", "metadata"),
    ("http://127.0.0.1:{port}/img.png", "allowed media domains"),
    ("file:///etc/passwd", "scheme"),
])
def test_redirects_are_checked_hop_by_hop(loopback, target, reason):
    started: list[str] = []
    url = loopback.url("/redirect?to=" + target.format(port=loopback.port), host="localhost")
    with pytest.raises(MediaRefused, match=reason):
        fetch(url, METADATA_LISTED, started)
    assert len(started) == 1  # the redirect target was never requested


def test_redirect_chains_are_bounded(loopback):
    assert fetch(loopback.url("/chain/3", host="localhost"), LOCALHOST_TRUSTED)
    with pytest.raises(MediaRefused, match="redirected more than 3"):
        fetch(loopback.url("/chain/4", host="localhost"), LOCALHOST_TRUSTED)


def test_download_size_is_capped_also_after_decompression(loopback):
    small = replace(LOCALHOST_TRUSTED, max_image_bytes=1024 * 1024)
    for path in ("/big", "/gzip-bomb"):
        with pytest.raises(MediaRefused, match="larger than the server's limit"):
            fetch(loopback.url(path, host="localhost"), small)


def test_download_time_is_capped(loopback):
    quick = replace(LOCALHOST_TRUSTED, fetch_timeout_s=1)
    started = time.monotonic()
    with pytest.raises(MediaRefused, match="within 1 s"):
        fetch(loopback.url("/slow", host="localhost"), quick)
    assert time.monotonic() - started < 3


def test_http_errors_are_refusals(loopback):
    with pytest.raises(MediaRefused, match="HTTP 404"):
        fetch(loopback.url("/status/404", host="localhost"), LOCALHOST_TRUSTED)


def test_pixel_cap_reads_only_the_header():
    media_fetch.check_pixels(png_bytes(make_image(1, (100, 100))), 10_000)
    with pytest.raises(MediaRefused, match="101x100"):
        media_fetch.check_pixels(png_bytes(make_image(1, (101, 100))), 10_000)
    started = time.monotonic()
    with pytest.raises(MediaRefused):
        media_fetch.check_pixels(bomb_png(), DEFAULT.max_image_pixels)  # 10^10 pixels declared
    assert time.monotonic() - started < 1


@pytest.fixture
def connector(monkeypatch):
    """vLLM's connector as the server loads it, with a chosen policy."""
    from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY

    def make(policy: MediaPolicy, **kwargs):
        monkeypatch.setattr(media_fetch, "_policy", policy)
        monkeypatch.setattr(media_fetch, "_sessions", {})
        return MEDIA_CONNECTOR_REGISTRY.load(media_fetch.CONNECTOR_NAME, **kwargs)

    return make


def test_connector_loads_allowed_images_and_refuses_the_rest(connector, loopback):
    async def load(conn, url):
        try:
            return await conn.fetch_image_async(url)
        finally:
            for session in media_fetch._sessions.values():  # noqa: SLF001
                await session.close()

    trusted = connector(LOCALHOST_TRUSTED, allowed_media_domains=["localhost"])
    image = asyncio.run(load(trusted, loopback.url("/img.png", host="localhost")))
    assert image.size == (336, 336)
    with pytest.raises(ValueError, match="pixels"):
        asyncio.run(load(trusted, loopback.url("/bomb.png", host="localhost")))

    default = connector(replace(DEFAULT, max_image_bytes=2000))
    with pytest.raises(ValueError, match="file://"):
        asyncio.run(load(default, "file:///etc/passwd"))
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(load(default, loopback.url("/img.png")))
    with pytest.raises(ValueError, match="limit of 2000 bytes"):
        big = base64.b64encode(png_bytes(make_image(3))).decode()
        asyncio.run(load(default, "data:image/png;base64," + big))
    with pytest.raises(ValueError, match="base64"):
        asyncio.run(load(default, "data:image/png,rawbytes"))
    tiny = "data:image/png;base64," + base64.b64encode(png_bytes(make_image(3, (8, 8)))).decode()
    assert asyncio.run(load(default, tiny)).size == (8, 8)
