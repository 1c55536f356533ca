"""Start `idselect serve` as a subprocess and wait until it answers: for the demo, benchmarks
and tests, which all need a real server on loopback."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from PIL import Image

IDSELECT = str(Path(sys.executable).with_name("idselect"))
# What the tiny CPU model needs besides the model path: fp32 and a small context.
TINY_MODEL_ARGS = ("--dtype", "float32", "--max-model-len", "2048")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    model: str | Path,
    log_path: Path,
    *extra: str,
    port: int | None = None,
    env: dict[str, str] | None = None,
    startup_timeout: float = 300,
    stock: bool = False,
) -> Iterator[RunningServer]:
    """`idselect serve MODEL --host 127.0.0.1 --port P *extra`, stopped (SIGTERM) on exit.

    `stock`: vLLM's own OpenAI server on the same options instead, with no plugin loaded
    (`VLLM_PLUGINS=none` names no plugin): the baseline benchmarks compare against."""
    port = port or free_port()
    child_env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    child_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU default wants most RAM
    child_env.update(env or {})
    where = ["--host", "127.0.0.1", "--port", str(port)]
    if stock:
        child_env["VLLM_PLUGINS"] = "none"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               *where, *extra]
    else:
        cmd = [IDSELECT, "serve", str(model), *where, *extra]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
        )
    server = RunningServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_healthy(server, startup_timeout)
        yield server
    finally:
        stop(server)


def wait_healthy(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n" + server.log()[-6000:]
            )
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("server did not become healthy:\n" + server.log()[-6000:])


def stop(server: RunningServer, timeout: float = 60) -> int | None:
    """SIGTERM the server's process group (engine processes included), SIGKILL if it hangs."""
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    return server.process.returncode


def image_data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, *images: Image.Image) -> list[dict]:
    """One user chat message: the images (as data URLs), then the text."""
    parts = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]
