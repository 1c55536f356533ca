"""The quarantine of vLLM internals (`idselect/vllm_plugin/compat.py`) refuses to run where vLLM
changed under it: a release outside the supported range, a hook that moved, an override whose
vLLM method is gone.

Their working path is covered end to end on 0.32 (exact usage through the server:
test_server*.py; M-RoPE positions: test_engine_qwen2_5_vl.py) and on the Python layers of 0.33
and 0.34 (test_vllm_releases.py); these check the guards. The unsupported release is this
venv's real vLLM with its version string changed, since no such release exists to install.
"""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from idselect.vllm_plugin import compat
from idselect.vllm_plugin.compat import (
    ChecksVLLMOverrides,
    VLLMCompatError,
    VLLMHookMissing,
    check_release,
    enable_position_recompute,
    overrides_vllm,
    propagate_to_processing,
)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.3", "0.33.0", "0.34.0", "0.34.1+cpu"])
def test_supported_releases_pass(version):
    assert check_release(version) == version


@pytest.mark.parametrize("version", ["0.31.2", "0.35.0", "0.35.0rc1", "0.34.1.dev12", "1.0.0",
                                     "unknown"])
def test_other_releases_are_refused_naming_the_release_and_the_range(version):
    with pytest.raises(VLLMCompatError, match=rf"vLLM {version}: it supports vLLM >=0\.32,<0\.35"):
        check_release(version)


def _run_with_vllm_version(version: str, code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter whose real vLLM reports `version`."""
    prelude = f"import vllm\nvllm.__version__ = {version!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)


def test_an_unsupported_release_stops_idselect_serve():
    done = _run_with_vllm_version("0.35.0", """
        from server.cli import main
        main(["serve", "some/model", "--visual-token-budget", "16"])
    """)
    assert done.returncode != 0
    assert "idselect does not support vLLM 0.35.0" in done.stderr
    assert ">=0.32,<0.35" in done.stderr


def test_an_unsupported_release_stops_every_vllm_process_through_the_plugin():
    """vLLM calls the plugin's entry point in each process it starts (front end, engine core,
    workers); an unsupported release makes that call raise, so the process stops."""
    done = _run_with_vllm_version("0.35.0", """
        from vllm.plugins import load_general_plugins
        load_general_plugins()
        print("plugins loaded")
    """)
    assert done.returncode != 0
    assert "plugins loaded" not in done.stdout
    assert "VLLMCompatError: idselect does not support vLLM 0.35.0" in done.stderr


def test_a_missing_hook_names_itself():
    with pytest.raises(VLLMHookMissing, match=r"`idselect serve` \(x\).*found neither "
                       r"vllm\.entrypoints\.nowhere\.x or vllm\.config\.x"):
        compat._find("`idselect serve` (x)", [("vllm.entrypoints.nowhere", "x"),
                                              ("vllm.config", "x")])


def test_hooks_resolve_on_the_installed_release():
    report = compat.hooks_report()
    assert report["release"] == "0.32.0"
    assert report["serve.make_arg_parser"].startswith("vllm.entrypoints.launchers.cli_args.")
    assert report["positions.V1 CPU runner"] == "runner flag"


def test_an_override_of_a_method_vllm_dropped_fails_at_class_creation():
    class VLLMBase:
        def kept(self, a, b):
            return a + b

    VLLMBase.__module__ = "vllm.model_executor.models.fake"

    class Mixin(ChecksVLLMOverrides):  # no vLLM base yet: not checked
        @overrides_vllm
        def dropped(self, a):
            return a

    with pytest.raises(VLLMHookMissing, match=r"Mixin\.dropped.*no longer define dropped"):
        type("Served", (Mixin, VLLMBase), {})

    class Renamed(ChecksVLLMOverrides):
        @overrides_vllm
        def kept(self, a, c):
            return a

    with pytest.raises(VLLMHookMissing, match=r"vLLM's kept now takes \(self, a, b\)"):
        type("Served", (Renamed, VLLMBase), {})

    class Fine(ChecksVLLMOverrides):
        @overrides_vllm
        def kept(self, *args, **kwargs):
            return super().kept(*args, **kwargs)

    assert type("Served", (Fine, VLLMBase), {})().kept(1, 2) == 3


def test_every_plugin_override_of_vllm_is_marked():
    """The check above only sees marked methods: every method of ours that replaces a vLLM
    method on a served class must carry the mark."""
    import importlib
    import inspect

    unmarked = []
    for arch in ("llava", "llava_next", "qwen2_5_vl", "qwen3_vl", "internvl"):
        module = importlib.import_module(f"idselect.vllm_plugin.{arch}")
        for cls in vars(module).values():
            if not inspect.isclass(cls) or not compat._vllm_bases(cls):
                continue
            vllm_names = {n for b in compat._vllm_bases(cls) for n in vars(b)}
            for klass in cls.__mro__:
                if not klass.__module__.startswith("idselect"):
                    continue
                for name, value in vars(klass).items():
                    if (callable(value) and not name.startswith("__") and name in vllm_names
                            and not getattr(value, "__overrides_vllm__", False)):
                        unmarked.append(f"{klass.__name__}.{name}")
    assert not unmarked


def test_request_context_needs_the_renderer_attributes():
    with pytest.raises(VLLMHookMissing, match="_process_multimodal"):
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


def test_position_switch_needs_the_pruning_method():
    config = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=SimpleNamespace()))
    with pytest.raises(VLLMHookMissing, match="is_multimodal_pruning_enabled"):
        enable_position_recompute(config)


def test_position_switch_answers_on_this_config_only():
    """Outside a runner's `load_model` (no V1 CPU runner on the stack) the config is what
    takes the switch; another config object keeps its own answer."""
    from vllm.config import MultiModalConfig

    ours, theirs = MultiModalConfig(), MultiModalConfig()
    assert not ours.is_multimodal_pruning_enabled()
    config = SimpleNamespace(model_config=SimpleNamespace(multimodal_config=ours))
    assert enable_position_recompute(config) == "config"
    assert ours.is_multimodal_pruning_enabled()
    assert not theirs.is_multimodal_pruning_enabled()
