"""`idselect serve`: vLLM's OpenAI server with the idselect layer and a start-up self-check.

The engine, the app and the HTTP server are vLLM's own (`build_async_engine_client`,
`build_and_serve`); idselect adds two ASGI middlewares through vLLM's `--middleware` mechanism,
sets the default budget through `hf_overrides`, and refuses to serve if the model workers do
not run the plugin's model class.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

from idselect.budget import BUDGET_KEY

MIDDLEWARE = ("server.budget_layer.VisualBudgetMiddleware", "server.auth.ApiKeyMiddleware")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _use_multiprocess_metrics() -> None:
    """Aggregate metrics of every process on one /metrics page.

    Must run before prometheus_client is imported (it picks its value store at import). A
    directory the operator set is used as is, like vLLM does; otherwise a fresh one per run.
    """
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="idselect-metrics-")


def build_parser():
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog="idselect serve",
        description="OpenAI-compatible VLM server with ID-Selection visual token pruning. "
        "Takes every `vllm serve` engine and frontend argument.",
        usage="idselect serve MODEL [--visual-token-budget N] [options]",
    )
    parser = make_arg_parser(parser)
    group = parser.add_argument_group("idselect")
    group.add_argument(
        "--visual-token-budget",
        type=_positive_int,
        default=os.environ.get("IDSELECT_VISUAL_TOKEN_BUDGET") or None,
        help="Default visual tokens per image when a request gives no visual_token_budget "
        "(default: no pruning; env IDSELECT_VISUAL_TOKEN_BUDGET).",
    )
    group.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=32 * 1024 * 1024,
        help="Largest accepted completion request body; larger ones get HTTP 413.",
    )
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model_tag is not None:
        args.model = args.model_tag
    if isinstance(args.visual_token_budget, str):  # from the environment
        args.visual_token_budget = _positive_int(args.visual_token_budget)
    validate_parsed_serve_args(args)
    if args.api_server_count not in (None, 1) or args.headless:
        parser.error("idselect serve runs a single API server; --api-server-count/--headless "
                     "are not supported")
    return args


def _adopt_idselect_options(args: argparse.Namespace) -> dict:
    """Turn our flags into vLLM settings; return what the HTTP layer keeps for itself."""
    keys = [k for k in (args.api_key or []) if k] or [
        k for k in (os.environ.get("IDSELECT_API_KEY"), os.environ.get("VLLM_API_KEY")) if k
    ]
    # Our middleware authenticates (OpenAI-shaped 401); keep vLLM's own from doubling it.
    args.api_key = None
    os.environ.pop("VLLM_API_KEY", None)

    if args.visual_token_budget is not None:
        args.hf_overrides = {**(args.hf_overrides or {}), BUDGET_KEY: args.visual_token_budget}
    trust_all = bool(args.trust_request_mm_kwargs)
    # The budget layer admits exactly the budget key per request (or everything if the operator
    # asked for vLLM's --trust-request-mm-kwargs); vLLM must not reject it first.
    args.trust_request_mm_kwargs = True
    args.middleware = [*(args.middleware or []), *MIDDLEWARE]
    return {"api_keys": keys, "trust_all": trust_all}


async def run(args: argparse.Namespace, options: dict) -> None:
    from vllm.entrypoints.launchers.api_server.entry import (
        build_and_serve,
        build_async_engine_client,
    )
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.logger import init_logger

    from idselect.vllm_plugin import full_image_tokens
    from idselect.vllm_plugin.selfcheck import PluginNotActiveError, verify_async
    from server.settings import ServerSettings

    logger = init_logger("vllm.idselect.serve")  # under "vllm": vLLM's log handlers

    def _interrupt_init(*_: object) -> None:  # until uvicorn installs its own handlers
        raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, _interrupt_init)
    listen_address, sock = setup_server(args, reuse_port=False)
    async with build_async_engine_client(args) as engine_client:
        model_config = engine_client.model_config
        hf_config = model_config.hf_config
        try:
            await verify_async(engine_client.collective_rpc, model_config.architectures)
        except PluginNotActiveError as exc:
            raise SystemExit(f"idselect: refusing to serve: {exc}") from None
        full = full_image_tokens(hf_config)
        args.idselect = ServerSettings(
            full_image_tokens=full,
            default_budget=args.visual_token_budget,
            trust_all_mm_kwargs=options["trust_all"],
            api_key_digests=tuple(ServerSettings.digest(k) for k in options["api_keys"]),
            max_request_bytes=args.max_request_bytes,
        )
        logger.info(
            "idselect: ID-Selection plugin active in the model workers; model=%s, "
            "visual tokens per image=%s, default visual_token_budget=%s, API key %s",
            args.model,
            full,
            args.visual_token_budget or "none (full)",
            "required" if options["api_keys"] else "not required",
        )
        shutdown_task = await build_and_serve(engine_client, listen_address, sock, args)
    try:
        await shutdown_task
    finally:
        sock.close()


def main(argv: list[str]) -> None:
    _use_multiprocess_metrics()
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = parse_args(argv)
    configure_logging_from_args(args)
    options = _adopt_idselect_options(args)
    try:
        uvloop.run(run(args, options))
    except KeyboardInterrupt:
        sys.exit(0)
