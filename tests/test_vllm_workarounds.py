"""The quarantined workarounds on vLLM internals refuse to run where vLLM changed under them.

Their working path is covered end to end (exact usage through the server: test_server*.py;
M-RoPE positions: test_engine_qwen2_5_vl.py); these check the guards, on stand-in objects
that lack what vLLM 0.32 has.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import vllm

from idselect.vllm_plugin.evs_switch import enable_position_recompute
from idselect.vllm_plugin.vllm_version import require_checked_vllm
from server.request_context import propagate_to_processing


def test_another_vllm_release_is_refused(monkeypatch):
    require_checked_vllm("x.py")  # the installed one passes
    monkeypatch.setattr(vllm, "__version__", "0.33.0")
    with pytest.raises(RuntimeError, match=r"x\.py works around vLLM 0\.32\.x.*0\.33\.0"):
        require_checked_vllm("x.py")


def test_request_context_needs_the_renderer_attributes():
    with pytest.raises(RuntimeError, match="_process_multimodal"):
        propagate_to_processing(SimpleNamespace(_process_multimodal=lambda: None))


def test_processing_runs_in_the_awaiting_requests_context():
    """The rebinding does what vLLM's own wrapper does not: the worker thread sees the
    request's context variables (vLLM's `run_in_executor` loses them)."""
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")
    executor = ThreadPoolExecutor(max_workers=1)
    renderer = SimpleNamespace(
        _process_multimodal=lambda x: (x, var.get()), _mm_executor=executor,
        _process_multimodal_async=None,
    )
    renderer._process_multimodal_async = lambda *a: None  # callable, as vLLM's wrapper is
    propagate_to_processing(renderer)

    async def request(name: str):
        var.set(name)
        return await renderer._process_multimodal_async(name)

    async def both():
        return await asyncio.gather(request("a"), request("b"))

    assert asyncio.run(both()) == [("a", "a"), ("b", "b")]
    executor.shutdown()


def test_evs_switch_needs_the_pruning_method():
    config = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=SimpleNamespace()))
    with pytest.raises(RuntimeError, match="is_multimodal_pruning_enabled"):
        enable_position_recompute(config)
