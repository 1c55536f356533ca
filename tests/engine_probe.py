"""Functions sent into vLLM's model worker (via `LLM.apply_model`) to record what the LLM is fed.

Test-only: callables over vLLM's RPC need VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the engine
tests set for their own engine. They are pickled by reference: spawned vLLM processes inherit the
test process's sys.path, so they import this module too.
"""

from __future__ import annotations

import torch


def install(model: torch.nn.Module) -> None:
    store: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args, output) -> None:
        store.append((args[0].detach().cpu().clone(), output.detach().cpu().clone()))

    model.multi_modal_projector.register_forward_hook(hook)
    model._idselect_probe = store


def drain(model: torch.nn.Module) -> list[tuple[list, list]]:
    """(projector input, projector output) per embedding step since the last drain.

    As nested lists: vLLM's RPC result encoding does not round-trip tensors.
    """
    calls = [(a.tolist(), b.tolist()) for a, b in model._idselect_probe]
    model._idselect_probe.clear()
    return calls
