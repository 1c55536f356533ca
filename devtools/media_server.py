"""A tiny HTTP server on 127.0.0.1 that serves test images, redirects and hostile responses.

It records every request it receives, so SSRF tests can prove the server under test never
connected. Redirect targets other than loopback (the metadata address) are only ever named in a
Location header; nothing here sends traffic anywhere but 127.0.0.1.
"""

from __future__ import annotations

import gzip
import io
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from PIL import Image

METADATA_URL = "http://169.254.169.254/latest/meta-data/"


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height pixels, with a few bytes of image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b""))


@dataclass
class MediaServer:
    port: int
    hits: list[str] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@contextmanager
def media_server(image: Image.Image) -> Iterator[MediaServer]:
    """Paths: /img.png, /big (3 MB), /gzip-bomb (64 MiB of zeros gzipped), /slow (5 s),
    /bomb.png, /redirect?to=URL, /chain/N (N redirects), /status/CODE."""
    image_bytes = png_bytes(image)
    gzip_bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)
    state: dict[str, MediaServer] = {}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes = b"", **headers: str) -> None:
            self.send_response(status)
            headers.setdefault("Content-Type", "application/octet-stream")
            for name, value in headers.items():
                self.send_header(name.replace("_", "-"), value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            server = state["server"]
            server.hits.append(self.path)
            path, _, query = self.path.partition("?")
            if path == "/img.png":
                self._send(200, image_bytes, Content_Type="image/png")
            elif path == "/big":
                self._send(200, b"\0" * (3 * 1024 * 1024))
            elif path == "/gzip-bomb":
                self._send(200, gzip_bomb, Content_Encoding="gzip", Content_Type="image/png")
            elif path == "/slow":
                time.sleep(5)
                self._send(200, image_bytes, Content_Type="image/png")
            elif path == "/bomb.png":
                self._send(200, bomb_png(), Content_Type="image/png")
            elif path == "/redirect":
                self._send(302, Location=unquote(query.removeprefix("to=")))
            elif path.startswith("/chain/"):
                left = int(path.rsplit("/", 1)[1])
                self._send(302, Location=f"/chain/{left - 1}" if left > 1 else "/img.png")
            elif path.startswith("/status/"):
                self._send(int(path.rsplit("/", 1)[1]))
            else:
                self._send(404)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    state["server"] = MediaServer(httpd.server_address[1])
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield state["server"]
    finally:
        httpd.shutdown()
        httpd.server_close()
