"""vLLM plugin: serves the supported VLM architectures with ID-Selection.

Loaded through the `vllm.general_plugins` entry point, so every vLLM process (front end, engine
core, workers, the model-inspection subprocess) runs it. The CPU platform spawns its workers, so an
in-process `ModelRegistry.register_model` call alone would leave the workers on the stock model.
"""

from __future__ import annotations

# Hugging Face architecture name -> "module:Class" of the plugin's model serving it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": (
        "idselect.vllm_plugin.llava:IDSelectLlavaForConditionalGeneration"
    ),
    "Qwen2_5_VLForConditionalGeneration": (
        "idselect.vllm_plugin.qwen2_5_vl:IDSelectQwen2_5_VLForConditionalGeneration"
    ),
    "LlavaNextForConditionalGeneration": (
        "idselect.vllm_plugin.llava_next:IDSelectLlavaNextForConditionalGeneration"
    ),
    "InternVLForConditionalGeneration": (
        "idselect.vllm_plugin.internvl:IDSelectInternVLForConditionalGeneration"
    ),
    "Qwen3VLForConditionalGeneration": (
        "idselect.vllm_plugin.qwen3_vl:IDSelectQwen3VLForConditionalGeneration"
    ),
}


def plugin_model_class(architectures: list[str] | None) -> str | None:
    """Class name the workers must run for a config's architectures; None if unsupported."""
    for arch in architectures or []:
        if arch in ARCHITECTURES:
            return ARCHITECTURES[arch].rsplit(":", 1)[1]
    return None


def register() -> None:
    """Entry point: point the architectures we prune at our model classes (lazily imported).

    Refuses a vLLM release outside the supported range first: vLLM calls this in every process
    it starts, so the process stops with the reason instead of serving on unchecked internals.
    """
    from vllm import ModelRegistry

    from idselect.vllm_plugin.compat import check_release

    check_release()

    for arch, target in ARCHITECTURES.items():
        ModelRegistry.register_model(arch, target)
