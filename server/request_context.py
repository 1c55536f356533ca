"""Workaround, quarantined: run vLLM's multimodal processing in the HTTP request's context.

The multimodal processor reports each request's visual usage into a context variable the HTTP
layer set for that request (`idselect.vllm_plugin.usage`). vLLM 0.32's renderer runs the
processor on a thread pool through `loop.run_in_executor`, which does not carry context
variables. `propagate_to_processing` rebinds the renderer's `_process_multimodal_async` to the
same call on the same single-worker executor, run inside a copy of the awaiting request's
context. Checked against vLLM 0.32: the attributes it relies on are verified first, and anything
missing refuses start-up instead of serving responses without usage.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import Executor
from functools import partial

from idselect.vllm_plugin.vllm_version import require_checked_vllm


def propagate_to_processing(renderer: object) -> None:
    require_checked_vllm("server/request_context.py")
    process = getattr(renderer, "_process_multimodal", None)
    executor = getattr(renderer, "_mm_executor", None)
    wrapped = getattr(renderer, "_process_multimodal_async", None)
    if not callable(process) or not isinstance(executor, Executor) or not callable(wrapped):
        raise RuntimeError(
            f"{type(renderer).__name__} no longer has _process_multimodal, _mm_executor and "
            "_process_multimodal_async: idselect cannot see which request a processed image "
            "belongs to"
        )

    async def process_in_request_context(*args, **kwargs):
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, partial(context.run, process, *args, **kwargs))

    renderer._process_multimodal_async = process_in_request_context
