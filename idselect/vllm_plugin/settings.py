"""Deployment-wide plugin settings, carried on the model's Hugging Face config.

They travel as `hf_overrides` (the `idselect serve` flags set them), because the HF config is the
one object vLLM hands, unchanged, to the front-end processor and to every spawned worker. Unlike
`--mm-processor-kwargs`, it never reaches the Hugging Face processor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from vllm.logger import init_logger

from idselect.options import BUDGET_KEY, OPTION_KEYS, VisualOptions, parse_budget
from idselect.selection import check_gamma, check_suppression, resolve_backend

logger = init_logger("vllm.idselect.plugin")  # under "vllm": vLLM's log handlers

GAMMA_KEY = "idselect_gamma"
SUPPRESSION_KEY = "idselect_suppression"
MICRO_BATCH_KEY = "idselect_encoder_micro_batch"
# The most visual tokens any image keeps (`idselect serve --max-visual-token-budget`).
MAX_BUDGET_KEY = "idselect_max_visual_token_budget"
# Every key of the HF config that carries an idselect setting.
SETTING_KEYS = (*OPTION_KEYS, GAMMA_KEY, SUPPRESSION_KEY, MICRO_BATCH_KEY, MAX_BUDGET_KEY)


@dataclass(frozen=True)
class PluginSettings:
    # The deployment's defaults for what requests leave unset (`idselect serve` flags).
    defaults: VisualOptions = VisualOptions()
    gamma: float = 20.0
    suppression: Literal["subtract", "multiply"] = "subtract"
    # Images per vision-tower pass: the scheduler charges only K placeholders per image against
    # the encoder budget, so one encoder batch can hold far more images than profiling assumed.
    encoder_micro_batch: int = 8
    # No image keeps more tokens: requests above it are refused, requests without a budget get
    # min(default, it), and vLLM's per-image token reservations and profiling follow it.
    max_budget: int | None = None
    # The backend `id_select(backend="auto")` resolves to on the model's device (for the log and
    # to fail at start-up, not at the first request, when IDSELECT_SELECTION_BACKEND is wrong).
    selection_backend: str | None = None  # resolved by `for_model`, on the workers' device

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> PluginSettings:
        """The settings an HF config (with `hf_overrides` applied) carries, validated."""
        return cls.from_mapping({key: getattr(hf_config, key) for key in SETTING_KEYS
                                 if getattr(hf_config, key, None) is not None})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PluginSettings:
        """Validate the settings' keys of a mapping (`hf_overrides`); each error names its key.

        `idselect serve` runs this on its flags before the engine starts, so a bad value stops
        start-up; the processor and the model read the config with it once each.
        """
        defaults = VisualOptions.parse(values, prefix="default ")
        try:
            gamma = check_gamma(values.get(GAMMA_KEY, cls.gamma))
        except ValueError as exc:
            raise ValueError(f"{GAMMA_KEY}: {exc}") from None
        try:
            suppression = check_suppression(values.get(SUPPRESSION_KEY, cls.suppression))
        except ValueError as exc:
            raise ValueError(f"{SUPPRESSION_KEY}: {exc}") from None
        micro = values.get(MICRO_BATCH_KEY, cls.encoder_micro_batch)
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise ValueError(f"{MICRO_BATCH_KEY} must be an integer >= 1, got {micro!r}")
        cap = parse_budget(values.get(MAX_BUDGET_KEY), MAX_BUDGET_KEY)
        if cap is not None and defaults.budget is not None and defaults.budget > cap:
            raise ValueError(
                f"the default {BUDGET_KEY} {defaults.budget} is above {MAX_BUDGET_KEY} {cap}: "
                "no image may keep more than the maximum (--visual-token-budget <= "
                "--max-visual-token-budget)")
        return cls(defaults, gamma, suppression, micro, cap)

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
            f"suppression={self.suppression}, maximum budget: {self.max_budget or 'none'}"
            + (f", selection backend: {self.selection_backend}" if self.selection_backend else "")
        )
