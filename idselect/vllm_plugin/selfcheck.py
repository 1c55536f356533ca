"""Start-up check that the model workers really run the plugin's model class.

The silent failure this guards against: the plugin registered only in the front end (a parent
process `register_model`, or a worker image without the package) gives K placeholders per image
while the spawned workers run vLLM's stock LLaVA, whose 576 embeddings vLLM then cuts to the first
K in raster order without any error. `get_model_inspection` is a plain worker method, so the check
needs no pickled callables.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from idselect.vllm_plugin import PLUGIN_MODEL_CLASS


class PluginNotActiveError(RuntimeError):
    pass


def check_inspections(inspections: Sequence[str]) -> None:
    """Raise unless every worker's model tree is rooted at the plugin's model class."""
    if not inspections:
        raise PluginNotActiveError("no model workers answered the idselect start-up check")
    roots = [text.split("(", 1)[0].strip() for text in inspections]
    wrong = [root for root in roots if root != PLUGIN_MODEL_CLASS]
    if wrong:
        raise PluginNotActiveError(
            f"model workers run {sorted(set(wrong))}, not {PLUGIN_MODEL_CLASS}: the idselect vLLM "
            "plugin did not load in the worker processes, so visual tokens would be cut instead "
            "of selected. Install idselect in the serving environment (it registers through the "
            "`vllm.general_plugins` entry point) and make sure VLLM_PLUGINS, if set, names "
            "'idselect'."
        )


def verify_offline(llm) -> None:
    """Check a `vllm.LLM`."""
    check_inspections(llm.collective_rpc("get_model_inspection"))


async def verify_async(collective_rpc: Callable[[str], Awaitable[list[str]]]) -> None:
    """Check an engine client, given its `collective_rpc` coroutine function."""
    check_inspections(await collective_rpc("get_model_inspection"))
