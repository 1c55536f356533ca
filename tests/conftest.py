"""Shared fixtures: the tiny LLaVA model (built by code, once per session) and test images.

Environment set here, before anything imports prometheus_client or vLLM:
- PROMETHEUS_MULTIPROC_DIR: the plugin's selection histogram is recorded in the spawned model
  worker; multiprocess mode lets the test process read it (this is how the server runs too).
- VLLM_CPU_KVCACHE_SPACE: the CPU backend would otherwise try to reserve most of host RAM.
- Under pytest-xdist, each worker process gets its share of the cores: its vLLM engines are bound
  to them (VLLM_CPU_OMP_THREADS_BIND; vLLM's default binds every engine to the first core) and
  torch, here and in its servers, runs that many threads (OMP_NUM_THREADS; threads beyond the
  cores spin against the other worker's and slowed the test bed's training 2.5 times).
And triton is imported under its CPU interpreter before anything else imports it, so that the
selection tests can run the Triton kernel on CPU tensors (tests/triton_interpreter.py).
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", tempfile.mkdtemp(prefix="idselect-prom-"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if worker := os.environ.get("PYTEST_XDIST_WORKER"):  # "gw0", "gw1", ...: cores of its own
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    first = int(worker[2:]) * share % len(cores)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND",
                          ",".join(str(c) for c in cores[first:first + share]))
    os.environ.setdefault("OMP_NUM_THREADS", str(share))

from tests.triton_interpreter import import_interpreted  # noqa: E402

import_interpreted()

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from idselect.tiny_checkpoint import write_tiny_llava  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava(tmp_path_factory.mktemp("models") / "tiny-llava")


def make_image(seed: int, size: tuple[int, int] = (336, 336)) -> Image.Image:
    """A reproducible image with spatial structure (blocks plus noise), not flat noise.

    Structure gives the vision tower near-duplicate patches, which is what selection is about.
    """
    rng = np.random.default_rng(seed)
    w, h = size
    blocks = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    base = np.kron(blocks, np.ones((h // 6 + 1, w // 6 + 1, 1), dtype=np.uint8))[:h, :w]
    noise = rng.integers(-20, 21, size=(h, w, 3))
    return Image.fromarray(np.clip(base.astype(int) + noise, 0, 255).astype(np.uint8))


@contextmanager
def refused(parameter: str, match: str | None = None) -> Iterator[None]:
    """The block raises the processor's refusal of an idselect option (vLLM's validation error,
    a 400 naming `parameter` through the server), and names `parameter` as data."""
    from idselect.vllm_plugin.processing import OptionRefused

    with pytest.raises(OptionRefused, match=match or parameter) as info:
        yield
    assert info.value.parameter == parameter


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a test that takes minutes (`slow`, `releases`) run first, each kept whole:
    under xdist (`--no-loadscope-reorder`) the worker processes start on them, instead of one of
    them ending the run alone with the test bed's training."""
    long_running = {item.path for item in items
                    if item.get_closest_marker("slow") or item.get_closest_marker("releases")}
    items.sort(key=lambda item: item.path not in long_running)
