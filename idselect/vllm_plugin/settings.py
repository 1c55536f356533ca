"""Deployment-wide plugin settings, carried on the model's Hugging Face config.

They travel as `hf_overrides` (the `idselect serve` flags set them), because the HF config is the
one object vLLM hands, unchanged, to the front-end processor and to every spawned worker. Unlike
`--mm-processor-kwargs`, it never reaches the Hugging Face processor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import torch
from vllm.logger import init_logger

from idselect.options import OPTION_KEYS, VisualOptions
from idselect.selection import resolve_backend

logger = init_logger("vllm.idselect.plugin")  # under "vllm": vLLM's log handlers

GAMMA_KEY = "idselect_gamma"
SUPPRESSION_KEY = "idselect_suppression"
MICRO_BATCH_KEY = "idselect_encoder_micro_batch"


@dataclass(frozen=True)
class PluginSettings:
    # The deployment's defaults for what requests leave unset (`idselect serve` flags).
    defaults: VisualOptions = VisualOptions()
    gamma: float = 20.0
    suppression: Literal["subtract", "multiply"] = "subtract"
    # Images per vision-tower pass: the scheduler charges only K placeholders per image against
    # the encoder budget, so one encoder batch can hold far more images than profiling assumed.
    encoder_micro_batch: int = 8
    # The backend `id_select(backend="auto")` resolves to on the model's device (for the log and
    # to fail at start-up, not at the first request, when IDSELECT_SELECTION_BACKEND is wrong).
    selection_backend: str = "torch"

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> PluginSettings:
        defaults = VisualOptions.parse(
            {key: getattr(hf_config, key, None) for key in OPTION_KEYS}, prefix="default "
        )
        gamma = float(getattr(hf_config, GAMMA_KEY, cls.gamma))
        suppression = getattr(hf_config, SUPPRESSION_KEY, cls.suppression)
        micro = getattr(hf_config, MICRO_BATCH_KEY, cls.encoder_micro_batch)
        if not gamma > 0:
            raise ValueError(f"{GAMMA_KEY} must be > 0, got {gamma}")
        if suppression not in ("subtract", "multiply"):
            raise ValueError(f"{SUPPRESSION_KEY} must be 'subtract' or 'multiply'")
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise ValueError(f"{MICRO_BATCH_KEY} must be an integer >= 1, got {micro!r}")
        return cls(defaults, gamma, suppression, micro)

    @classmethod
    def for_model(cls, vllm_config: Any) -> PluginSettings:
        """Settings of a model being built, refusing the one place a default must not go."""
        mm_config = vllm_config.model_config.multimodal_config
        configured = (mm_config.mm_processor_kwargs or {}) if mm_config is not None else {}
        for key in OPTION_KEYS:
            if key in configured:
                raise ValueError(
                    f"set the default {key} with the `idselect serve` flag (or "
                    f"hf_overrides={{'{key}': ...}}), not --mm-processor-kwargs, which would "
                    "hand it to the Hugging Face processor"
                )
        settings = cls.from_hf_config(vllm_config.model_config.hf_config)
        device = torch.device(vllm_config.device_config.device_type)
        backend = resolve_backend("auto", device)
        logger.info("idselect: selection backend %s on %s", backend, device.type)
        return dataclasses.replace(settings, selection_backend=backend)

    def describe(self) -> str:
        """The settings for the start-up log line."""
        return (
            f"default budget: {self.defaults.budget or 'full'}, importance: "
            f"{self.defaults.importance or 'visual'}, selector: "
            f"{self.defaults.selector or 'id_select'}, gamma={self.gamma}, "
            f"suppression={self.suppression}, selection backend: {self.selection_backend}"
        )
