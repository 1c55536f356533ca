"""Bodies that crash vLLM's own request validation get a 400, not a 500.

vLLM's request models run `model_validator(mode="before")` hooks on the raw JSON before pydantic
checks any type, and some assume a field's type (`structured_outputs.get(...)` on a list, found
by schema fuzzing): the AttributeError escapes pydantic and vLLM answers 500. This guard runs the
same model on the body first; when validation crashes (AttributeError, TypeError, KeyError,
IndexError) the body is refused here. Every other validation failure (pydantic's
ValidationError, vLLM's VLLMValidationError, ...) is left to vLLM, which answers it with a 400.
"""

from __future__ import annotations

from typing import Any

from server.request.rejected import RequestRejected

# What a crashing validator raises; ValueError is pydantic's (and vLLM's) "invalid" signal.
_CRASHES = (AttributeError, TypeError, KeyError, IndexError)


def _models() -> dict[str, Any]:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest}


_MODELS: dict[str, Any] = {}


def check_validates(path: str, body: dict[str, Any]) -> None:
    if not _MODELS:
        _MODELS.update(_models())
    try:
        _MODELS[path].model_validate(body)
    except _CRASHES as exc:
        raise RequestRejected(
            f"the request body has a field of the wrong type or shape; validation failed with "
            f"{type(exc).__name__}: {str(exc)[:200]}",
            None,
        ) from None
    except Exception:  # pydantic's ValidationError, vLLM's VLLMValidationError, ...
        return  # ... vLLM answers these itself with a 400 in its own words
