"""What the HTTP layer needs to know about the deployment, fixed at start-up."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    # The operator opened every HF processor kwarg to clients (vLLM's --trust-request-mm-kwargs).
    trust_all_mm_kwargs: bool = False
    max_request_bytes: int = 32 * 1024 * 1024
