"""What the HTTP layer needs to know about the deployment, fixed at start-up."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

from idselect.options import VisualOptions


@dataclass(frozen=True)
class ServerSettings:
    # The deployment's defaults, as the model's plugin settings resolve them (one place).
    defaults: VisualOptions = VisualOptions()
    # The operator opened every HF processor kwarg to clients (vLLM's --trust-request-mm-kwargs).
    trust_all_mm_kwargs: bool = False
    # sha256 digests of the accepted API keys; empty means no authentication.
    api_key_digests: tuple[bytes, ...] = field(default=(), repr=False)
    max_request_bytes: int = 32 * 1024 * 1024

    @staticmethod
    def digest(key: str) -> bytes:
        return hashlib.sha256(key.encode("utf-8")).digest()

    def key_matches(self, presented: str) -> bool:
        """Constant-time: compare fixed-length digests, and always against every key."""
        candidate = self.digest(presented)
        match = False
        for known in self.api_key_digests:
            match |= secrets.compare_digest(candidate, known)
        return match
