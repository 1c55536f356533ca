"""`idselect serve`: vLLM's OpenAI server with the idselect layer and a start-up self-check.

The engine, the app and the HTTP server are vLLM's own (`build_async_engine_client`,
`build_and_serve`); idselect adds two ASGI middlewares through vLLM's `--middleware` mechanism,
sets the default budget through `hf_overrides`, and refuses to serve if the model workers do
not run the plugin's model class.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
from typing import Any

from idselect.options import (
    BUDGET_KEY,
    IMPORTANCE_KEY,
    IMPORTANCE_NAMES,
    SELECTOR_KEY,
    SELECTORS,
    OptionError,
    VisualOptions,
)
from idselect.selection import BACKEND_ENV, BACKENDS
from server.media_policy import (
    DEFAULT_FETCH_TIMEOUT_S,
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_REDIRECTS,
    MediaPolicy,
)

# vLLM adds these in order and each added one wraps the ones before: the last is outermost.
# The API-key check comes before any request is looked at; OpenAI's error shape wraps it.
MIDDLEWARE = (
    "server.middleware.engine_guard.EngineGuardMiddleware",
    "server.middleware.visual_usage.VisualBudgetMiddleware",
    "server.middleware.auth.ApiKeyMiddleware",
    "server.middleware.openai_errors.OpenAIErrorMiddleware",
    "server.middleware.openapi_schema.OpenAPISchemaMiddleware",
)
# Defaults that differ from `vllm serve`'s: drain in-flight requests for up to 30 s on SIGTERM
# (vLLM's 0 aborts them), at most 8 images per request (vLLM's 999), and no multimodal
# processor cache: vLLM 0.32's front-end/engine mirrored cache can drift when the same image is
# in flight concurrently, and vLLM then fails the request with a 500 for the client to retry
# (seen in the soak). `--mm-processor-cache-gb N` turns it back on.
SHUTDOWN_TIMEOUT_S = 30
DEFAULT_IMAGE_LIMIT = 8
MM_PROCESSOR_CACHE_GB = 0


def _option(key: str, convert=str):
    """An argparse type for a deployment default of a request option: the same validator as
    the request's (`VisualOptions.parse`). argparse also runs it on a string default, i.e. on
    the value an environment variable gives, and names the flag in its error."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
        try:
            return VisualOptions.parse({key: value}).as_kwargs()[key]
        except OptionError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = key  # argparse's "invalid <name> value" messages
    return parse


def _one_of(names: tuple[str, ...]):
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {text!r}")
        return text

    return parse


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


_metrics_dir: tempfile.TemporaryDirectory | None = None


def _use_multiprocess_metrics() -> None:
    """Aggregate metrics of every process on one /metrics page.

    What vLLM's `setup_multiprocess_prometheus` does (a directory the operator set is used as
    is; otherwise a temporary one, removed at exit), but before prometheus_client is imported:
    it picks its value store at import, and vLLM's helper imports it first, too late for the
    counters this process (the API server) records itself.
    """
    global _metrics_dir
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        _metrics_dir = tempfile.TemporaryDirectory(prefix="idselect-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_dir.name


def build_parser():
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from idselect.vllm_plugin.compat import serve_entry_points

    parser = FlexibleArgumentParser(
        prog="idselect serve",
        description="OpenAI-compatible VLM server with ID-Selection visual token pruning. "
        "Takes every `vllm serve` engine and frontend argument.",
        usage="idselect serve MODEL [--visual-token-budget N] [options]",
    )
    parser = serve_entry_points().make_arg_parser(parser)
    group = parser.add_argument_group("idselect")
    group.add_argument(
        "--visual-token-budget",
        type=_option(BUDGET_KEY, int),
        default=os.environ.get("IDSELECT_VISUAL_TOKEN_BUDGET") or None,
        help="Default visual tokens per image when a request gives no visual_token_budget "
        "(default: no pruning; env IDSELECT_VISUAL_TOKEN_BUDGET).",
    )
    group.add_argument(
        "--max-visual-token-budget",
        type=_option(BUDGET_KEY, int),
        default=os.environ.get("IDSELECT_MAX_VISUAL_TOKEN_BUDGET") or None,
        help="No image keeps more visual tokens than this: requests asking for more get a 400, "
        "requests without a budget get min(--visual-token-budget, this), and vLLM reserves "
        "and profiles for this many tokens per image (default: no maximum; env "
        "IDSELECT_MAX_VISUAL_TOKEN_BUDGET).",
    )
    group.add_argument(
        "--visual-token-importance",
        type=_option(IMPORTANCE_KEY),
        metavar="{" + ",".join(IMPORTANCE_NAMES) + "}",
        default=os.environ.get("IDSELECT_VISUAL_TOKEN_IMPORTANCE") or None,
        help="Default importance score when a request gives no visual_token_importance: visual "
        "(the vision tower's own saliency, the default; cls is its older name on [CLS] towers), "
        "text (pre-LLM prompt relevance) or unified (their mean); "
        "env IDSELECT_VISUAL_TOKEN_IMPORTANCE.",
    )
    group.add_argument(
        "--visual-token-selector",
        type=_option(SELECTOR_KEY),
        metavar="{" + ",".join(SELECTORS) + "}",
        default=os.environ.get("IDSELECT_VISUAL_TOKEN_SELECTOR") or None,
        help="Default selector when a request gives no visual_token_selector: id_select (the "
        "default), or a baseline for A/B runs: topk (importance only), divprune (diversity "
        "only), random (seeded per image), pool (uniform spatial sampling); env "
        "IDSELECT_VISUAL_TOKEN_SELECTOR.",
    )
    group.add_argument(
        "--selection-backend",
        type=_one_of(BACKENDS),
        metavar="{" + ",".join(BACKENDS) + "}",
        default=os.environ.get(BACKEND_ENV) or "auto",
        help="How the model workers run ID-Selection's greedy loop: triton (one kernel launch "
        "per encoder batch, CUDA), torch, or auto (triton on CUDA when it imports, else torch); "
        f"env {BACKEND_ENV}.",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=32 * 1024 * 1024,
        help="Largest accepted completion request body; larger ones get HTTP 413.",
    )
    media = parser.add_argument_group(
        "idselect media safety",
        "Image URLs are fetched only over http(s), only from globally routable addresses (every "
        "redirect hop and every resolved address is checked), within these limits. vLLM's "
        "--allowed-media-domains restricts fetches to the listed hosts and lets those resolve to "
        "private addresses.",
    )
    media.add_argument(
        "--allow-private-media-urls",
        action="store_true",
        help="Also fetch image URLs that resolve to loopback, private or link-local addresses "
        "(only for servers whose clients are trusted).",
    )
    media.add_argument(
        "--max-image-bytes",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_BYTES,
        help="Largest image, downloaded or inline (data: URL), in bytes.",
    )
    media.add_argument(
        "--max-image-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="Largest image in pixels (width x height, read from the header before decoding).",
    )
    media.add_argument(
        "--media-fetch-timeout",
        type=_positive_float,
        default=DEFAULT_FETCH_TIMEOUT_S,
        help="Seconds one image download may take in all, redirects included.",
    )
    parser.set_defaults(
        shutdown_timeout=SHUTDOWN_TIMEOUT_S, mm_processor_cache_gb=MM_PROCESSOR_CACHE_GB
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    from idselect.vllm_plugin.compat import serve_entry_points
    from idselect.vllm_plugin.settings import PluginSettings

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    cap, default = args.max_visual_token_budget, args.visual_token_budget
    if cap is not None and default is not None and default > cap:
        parser.error(f"--visual-token-budget {default} is above --max-visual-token-budget {cap}: "
                     "no image may keep more than the maximum")
    try:  # with what --hf-overrides gives (gamma, suppression, ...), the flags winning
        PluginSettings.from_mapping(_idselect_overrides(args))
    except ValueError as exc:
        parser.error(f"--hf-overrides: {exc}")
    serve_entry_points().validate_parsed_serve_args(args)
    if args.api_server_count not in (None, 1) or args.headless:
        parser.error("idselect serve runs a single API server; --api-server-count/--headless "
                     "are not supported")
    return args


def _idselect_overrides(args: argparse.Namespace) -> dict:
    """`--hf-overrides` with the idselect flags added: the HF config carries the deployment's
    settings to the processor and to every model worker."""
    from idselect.vllm_plugin.settings import MAX_BUDGET_KEY

    flags = {BUDGET_KEY: args.visual_token_budget, IMPORTANCE_KEY: args.visual_token_importance,
             SELECTOR_KEY: args.visual_token_selector,
             MAX_BUDGET_KEY: args.max_visual_token_budget}
    overrides = args.hf_overrides if isinstance(args.hf_overrides, dict) else {}
    return {**overrides, **{key: value for key, value in flags.items() if value is not None}}


def _adopt_idselect_options(args: argparse.Namespace) -> dict:
    """Turn our flags into vLLM settings; return what the HTTP layer keeps for itself."""
    from idselect.vllm_plugin.settings import PluginSettings

    keys = [k for k in (args.api_key or []) if k] or [
        k for k in (os.environ.get("IDSELECT_API_KEY"), os.environ.get("VLLM_API_KEY")) if k
    ]
    # vLLM's check, at our place in the stack (server.middleware.auth); not its own as well.
    args.api_key = None
    os.environ.pop("VLLM_API_KEY", None)
    from server.middleware import auth

    auth.configure(keys)

    overrides = _idselect_overrides(args)
    if overrides:
        args.hf_overrides = overrides
    # The model workers read it when they resolve id_select(backend="auto"); they inherit it.
    os.environ[BACKEND_ENV] = args.selection_backend
    trust_all = bool(args.trust_request_mm_kwargs)
    # The budget layer admits exactly the budget key per request (or everything if the operator
    # asked for vLLM's --trust-request-mm-kwargs); vLLM must not reject it first.
    args.trust_request_mm_kwargs = True
    args.middleware = [*(args.middleware or []), *MIDDLEWARE]
    if not args.limit_mm_per_prompt:
        args.limit_mm_per_prompt = {"image": DEFAULT_IMAGE_LIMIT}
    # Valid by construction (each flag and --hf-overrides were checked by parse_args).
    settings = PluginSettings.from_mapping(overrides)
    return {"api_keys": keys, "trust_all": trust_all, "settings": settings}


def media_policy(args: argparse.Namespace) -> MediaPolicy:
    """The media fetch rules from our flags and vLLM's own media options."""
    redirects = os.environ.get("VLLM_MEDIA_URL_ALLOW_REDIRECTS", "1").strip() not in ("0", "")
    return MediaPolicy(
        allow_private=args.allow_private_media_urls,
        allowed_domains=tuple(args.allowed_media_domains or ()),
        max_image_bytes=args.max_image_bytes,
        max_image_pixels=args.max_image_pixels,
        fetch_timeout_s=args.media_fetch_timeout,
        max_redirects=MAX_REDIRECTS if redirects else 0,
    )


async def run(args: argparse.Namespace, options: dict) -> None:
    import psutil
    from vllm.logger import init_logger

    from idselect.vllm_plugin import compat, usage
    from idselect.vllm_plugin.selfcheck import PluginNotActiveError, verify_async
    from server import media_fetch
    from server.middleware import engine_guard
    from server.settings import ServerSettings

    logger = init_logger("vllm.idselect.serve")  # under "vllm": vLLM's log handlers
    vllm_serve = compat.serve_entry_points()

    def _interrupt_init(*_: object) -> None:  # until uvicorn installs its own handlers
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = vllm_serve.setup_server(args, reuse_port=False)
    async with vllm_serve.build_async_engine_client(args) as engine_client:
        engine_guard.watch_shutdown(engine_client)
        engine_processes = _engine_processes(psutil.Process())
        model_config = engine_client.model_config
        try:
            await verify_async(engine_client.collective_rpc, model_config.architectures)
        except PluginNotActiveError as exc:
            raise SystemExit(f"idselect: refusing to serve: {exc}") from None
        # Visual usage: reported by the processor into each request's context, counted by the
        # HTTP layer (not by processing outside requests, e.g. /tokenize).
        compat.propagate_to_processing(engine_client.renderer)
        usage.count_in_http_layer()
        args.idselect = ServerSettings(
            trust_all_mm_kwargs=options["trust_all"], max_request_bytes=args.max_request_bytes)
        logger.info(
            "idselect: ID-Selection plugin active in the model workers of vLLM %s; model=%s, "
            "%s; API key %s", compat.check_release(), args.model, options["settings"].describe(),
            "required" if options["api_keys"] else "not required",
        )
        logger.info("idselect: media %s", media_fetch.current_policy())
        shutdown_task = await vllm_serve.build_and_serve(engine_client, listen_address, sock,
                                                         args)
    try:
        await shutdown_task
    finally:
        sock.close()
        await media_fetch.close_sessions()
    failed = compat.failed_engine_process(engine_client)
    if failed:  # vLLM stopped serving because the engine died: tell the supervisor
        # vLLM leaves the dead engine's model workers running (re-parented, GBs of memory).
        _stop_processes(engine_processes)
        logger.error("idselect: engine process %s died; exiting with status 1", failed)
        raise SystemExit(1)


def _engine_processes(main: Any) -> list:
    """This server's descendants, except multiprocessing's resource tracker (it must outlive
    the others to release their shared memory, and exits by itself)."""
    import psutil

    found = []
    for process in main.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "resource_tracker" not in " ".join(process.cmdline()):
                found.append(process)
    return found


def _stop_processes(processes: list, timeout: float = 10) -> None:
    """SIGTERM the processes still alive (psutil checks their identity), SIGKILL stragglers."""
    import psutil

    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def main(argv: list[str]) -> None:
    _use_multiprocess_metrics()
    import uvloop
    from vllm.logger import configure_logging_from_args

    from idselect.vllm_plugin.compat import VLLMCompatError, check_release, serve_entry_points

    try:
        check_release()
        vllm_serve = serve_entry_points()
    except VLLMCompatError as exc:
        raise SystemExit(f"idselect: {exc}") from None
    vllm_serve.cli_env_setup()
    args = parse_args(argv)
    configure_logging_from_args(args)
    options = _adopt_idselect_options(args)
    from server import media_fetch

    media_fetch.install(media_policy(args))
    try:
        uvloop.run(run(args, options))
    except KeyboardInterrupt:
        sys.exit(0)
