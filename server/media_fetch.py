"""vLLM's media connector with SSRF, size, time and pixel guards, selected the documented way.

vLLM loads image URLs through the connector registered as `VLLM_MEDIA_CONNECTOR` in
`MEDIA_CONNECTOR_REGISTRY`; `install()` registers this subclass and selects it (in the API server
process, where chat messages are parsed). What it changes:

- http(s) downloads go through one aiohttp session whose resolver drops the request when any
  address of the host is refused by `server.media_policy`; aiohttp connects only to the addresses
  that resolver returned, so the checked address is the one used (no DNS-rebinding gap).
  Redirects are followed by hand, each hop re-checked (scheme, allow-list, literal IP, resolution).
  One total deadline covers every hop; bodies stop at `max_image_bytes` (after decompression).
  Environment proxies are not used.
- data: URLs larger than `max_image_bytes` are refused before decoding.
- images are measured from their header before decoding; more than `max_image_pixels` is refused.
- file:// URLs are refused unless the operator gave vLLM's `--allowed-local-media-path`.
Every refusal is a ValueError, which vLLM answers with HTTP 400.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from io import BytesIO
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image
from vllm.multimodal.image import open_image
from vllm.multimodal.media import MEDIA_CONNECTOR_REGISTRY, MediaConnector
from vllm.multimodal.media.connector import global_thread_pool
from vllm.multimodal.media.image import ImageMediaIO

from server.media_policy import MediaPolicy, MediaRefused, check_address, check_url

CONNECTOR_NAME = "idselect"
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024

_policy = MediaPolicy()
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def install(policy: MediaPolicy) -> None:
    """Make vLLM use the guarded connector with `policy` in this process."""
    import os

    global _policy
    _policy = policy
    _sessions.clear()
    os.environ["VLLM_MEDIA_CONNECTOR"] = CONNECTOR_NAME
    # vLLM's and PIL's own pixel checks agree with ours (PIL raises only above twice this).
    os.environ["VLLM_MAX_IMAGE_PIXELS"] = str(policy.max_image_pixels)
    Image.MAX_IMAGE_PIXELS = policy.max_image_pixels


def current_policy() -> MediaPolicy:
    return _policy


class GuardedResolver(AbstractResolver):
    """Resolves like the system resolver, then refuses the host if any address is not allowed."""

    def __init__(self, policy: MediaPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        for result in results:
            address = ipaddress.ip_address(result["host"].split("%", 1)[0])
            check_address(host, address, self._policy)
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def new_session(
    policy: MediaPolicy,
    resolver: AbstractResolver | None = None,
    trace_configs: list[aiohttp.TraceConfig] | None = None,
) -> aiohttp.ClientSession:
    """A session that can only reach addresses the policy allows, and ignores proxy settings."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(policy, resolver), use_dns_cache=False, limit=64
    )
    return aiohttp.ClientSession(
        connector=connector, trust_env=False, auto_decompress=True, trace_configs=trace_configs
    )


async def fetch_bytes(url: str, policy: MediaPolicy, session: aiohttp.ClientSession) -> bytes:
    """Download `url` under `policy`: every hop checked, one deadline, a byte cap."""
    try:
        async with asyncio.timeout(policy.fetch_timeout_s):
            for _ in range(policy.max_redirects + 1):
                check_url(url, policy)
                async with session.get(
                    url, allow_redirects=False, headers={"User-Agent": "idselect (vLLM)"}
                ) as response:
                    if response.status in _REDIRECTS and "Location" in response.headers:
                        url = urljoin(url, response.headers["Location"])
                        continue
                    if response.status >= 400:
                        raise MediaRefused(f"image URL answered HTTP {response.status}")
                    return await _read_capped(response, policy.max_image_bytes)
            raise MediaRefused(f"image URL redirected more than {policy.max_redirects} times")
    except TimeoutError:
        raise MediaRefused(
            f"image download did not finish within {policy.fetch_timeout_s:g} s"
        ) from None
    except aiohttp.ClientError as exc:
        raise MediaRefused(f"could not download image: {type(exc).__name__}: {exc}") from None
    except OSError as exc:  # DNS failures and the like
        raise MediaRefused(f"could not download image: {exc}") from None


async def _read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(_CHUNK):
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> MediaRefused:
    return MediaRefused(f"image is larger than the server's limit of {limit} bytes")


def check_pixels(data: bytes, limit: int) -> None:
    """Refuse an image whose header declares more than `limit` pixels (nothing is decoded)."""
    try:
        with open_image(BytesIO(data)) as image:  # vLLM's allow-listed formats; header only
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own check: far more than any sane limit
        raise MediaRefused(
            f"image declares too many pixels; the server accepts at most {limit} per image"
        ) from None
    except Exception:  # not an image PIL can open: vLLM reports that in its own words
        return
    if width * height > limit:
        raise MediaRefused(
            f"image is {width}x{height} = {width * height} pixels; the server accepts at most "
            f"{limit} pixels per image"
        )


async def close_sessions() -> None:
    """Close this loop's download session (at server shutdown)."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


async def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = new_session(_policy)
    return session


def _decode(media_io: Any, data: bytes, policy: MediaPolicy) -> Any:
    if _is_image(media_io):
        check_pixels(data, policy.max_image_pixels)
    return media_io.load_bytes(data)


def _data_url_bytes(url: str, policy: MediaPolicy) -> bytes:
    import pybase64

    spec, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaRefused("malformed data URL: missing ','")
    if not spec.lower().endswith(";base64"):
        raise MediaRefused("data URLs must be base64-encoded (data:<type>;base64,<data>)")
    if len(payload) * 3 // 4 > policy.max_image_bytes:
        raise _too_large(policy.max_image_bytes)
    try:
        return pybase64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise MediaRefused(f"data URL is not valid base64: {exc}") from None


@MEDIA_CONNECTOR_REGISTRY.register(CONNECTOR_NAME)
class GuardedMediaConnector(MediaConnector):
    """vLLM's MediaConnector with URL loading routed through the guards above.

    The policy's allow-list is built from the same `--allowed-media-domains` vLLM hands this
    class. Inline (data:) media other than images keep vLLM's own decoding (LLaVA takes images
    only). The synchronous path (offline `LLM.chat`) downloads in a private event loop, so it
    must not be called from a thread that runs one.
    """

    def _scheme(self, url: str) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file" and self.allowed_local_media_path is None:
            raise MediaRefused("file:// image URLs are not accepted by this server")
        return scheme

    def load_from_url(self, url: str, media_io: Any, *, fetch_timeout: int | None = None):
        scheme = self._scheme(url)
        if scheme == "file" or (scheme == "data" and not _is_image(media_io)):
            return super().load_from_url(url, media_io, fetch_timeout=fetch_timeout)
        if scheme == "data":
            return _decode(media_io, _data_url_bytes(url, _policy), _policy)
        return _decode(media_io, asyncio.run(_download(url)), _policy)

    async def load_from_url_async(
        self, url: str, media_io: Any, *, fetch_timeout: int | None = None
    ):
        scheme = self._scheme(url)
        if scheme == "file" or (scheme == "data" and not _is_image(media_io)):
            return await super().load_from_url_async(url, media_io, fetch_timeout=fetch_timeout)
        loop = asyncio.get_running_loop()
        if scheme == "data":
            data = await loop.run_in_executor(global_thread_pool, _data_url_bytes, url, _policy)
        else:
            data = await fetch_bytes(url, _policy, await _session())
        return await loop.run_in_executor(global_thread_pool, _decode, media_io, data, _policy)


def _is_image(media_io: Any) -> bool:
    return isinstance(media_io, ImageMediaIO)


async def _download(url: str) -> bytes:
    """The synchronous path (offline use) runs its own loop, so it needs its own session."""
    async with new_session(_policy) as session:
        return await fetch_bytes(url, _policy, session)
