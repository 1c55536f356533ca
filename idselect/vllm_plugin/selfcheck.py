"""Start-up check that the model workers really run the plugin's model class.

The silent failure this guards against: the plugin registered only in the front end (a parent
process `register_model`, or a worker image without the package) gives K placeholders per image
while the spawned workers run vLLM's stock LLaVA, whose 576 embeddings vLLM then cuts to the first
K in raster order without any error. `get_model_inspection` is a plain worker method, so the check
needs no pickled callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from idselect.vllm_plugin import ARCHITECTURES, plugin_model_class


class PluginNotActiveError(RuntimeError):
    pass


def expected_class(architectures: list[str] | None) -> str:
    """The plugin class for these architectures, or a clear error if idselect has none."""
    expected = plugin_model_class(architectures)
    if expected is None:
        raise PluginNotActiveError(
            f"idselect does not support {architectures} yet; supported architectures: "
            f"{', '.join(ARCHITECTURES)}"
        )
    return expected


def check_inspections(inspections: Sequence[str], expected: str) -> None:
    """Raise unless every worker's model tree is rooted at the plugin's model class."""
    if not inspections:
        raise PluginNotActiveError("no model workers answered the idselect start-up check")
    roots = [text.split("(", 1)[0].strip() for text in inspections]
    wrong = [root for root in roots if root != expected]
    if wrong:
        raise PluginNotActiveError(
            f"model workers run {sorted(set(wrong))}, not {expected}: the idselect vLLM "
            "plugin did not load in the worker processes, so visual tokens would be cut instead "
            "of selected. Install idselect in the serving environment (it registers through the "
            "`vllm.general_plugins` entry point) and make sure VLLM_PLUGINS, if set, names "
            "'idselect'."
        )


def verify_offline(llm) -> None:
    """Check a `vllm.LLM`."""
    expected = expected_class(llm.llm_engine.model_config.architectures)
    check_inspections(llm.collective_rpc("get_model_inspection"), expected)


async def verify_async(
    collective_rpc: Callable[[str], Awaitable[list[str]]], architectures: list[str] | None
) -> None:
    """Check an engine client, given its `collective_rpc` coroutine function."""
    expected = expected_class(architectures)
    check_inspections(await collective_rpc("get_model_inspection"), expected)
