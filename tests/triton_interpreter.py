"""Run the Triton selection kernel on CPU tensors through Triton's interpreter, for tests.

TRITON_INTERPRET=1 must be set when triton itself is first imported (its own library functions
are decorated then, and interpreted kernels cannot call compiled ones), when our kernel is
decorated, and, because triton imports parts of itself lazily and checks the flag again, while
interpreted kernels run. `import_interpreted()` (called by conftest.py before any test module
imports vLLM or the profiler, which import triton) does the first two; `interpreted()` the
third. The flag is never left set for the whole session: vLLM engines that other tests start
must not inherit it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from idselect.selection import BACKEND_ENV


@contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def import_interpreted() -> None:
    """Import triton and the kernel module under the interpreter, once per process."""
    with _env(TRITON_INTERPRET="1"):
        import triton.language  # noqa: F401

        from idselect import selection_triton  # noqa: F401


@contextmanager
def interpreted() -> Iterator[None]:
    """Inside: backend="triton" runs the kernel through the interpreter on CPU tensors."""
    with _env(TRITON_INTERPRET="1"):
        from idselect import selection_triton

        if not selection_triton.is_interpreted():
            raise RuntimeError(
                "idselect.selection_triton was imported without TRITON_INTERPRET=1 before "
                "import_interpreted() ran; call it first (conftest.py does)"
            )
        yield


@contextmanager
def selection_backend(name: str) -> Iterator[None]:
    """Inside: every `backend="auto"` call runs on backend `name` (the deployment override)."""
    with interpreted(), _env(**{BACKEND_ENV: name}):
        yield
