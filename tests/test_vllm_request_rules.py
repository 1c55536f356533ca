"""Every body that crashes vLLM's own request validation is refused by a named rule of ours.

vLLM's request models run `model_validator(mode="before")` hooks on the raw JSON before pydantic
checks any type; a hook that assumes a field's type raises AttributeError / TypeError, which
vLLM answers with a 500. The HTTP layer does not run vLLM's validation a second time to catch
those: it refuses the known crashers by name (`server.request.vllm_options.PRE_VALIDATED_FIELDS`).
This test finds the crashers itself, by giving every field of vLLM's chat and completion request
models values of every JSON type, and checks each is one our rules refuse. On a vLLM whose hooks
assume more, it fails naming the field.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from server.request.options import prepare
from server.request.rejected import RequestRejected
from server.settings import ServerSettings

WRONG_TYPES = ([1], [], "x", 5, 1.5, True, {"a": 1}, {}, None)
CONTEXTS = ({}, {"stream": True}, {"use_beam_search": True}, {"logprobs": True})


def _models():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return {
        "chat": (ChatCompletionRequest,
                 {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        "completion": (CompletionRequest, {"model": "m", "prompt": "hi"}),
    }


def _crashes(model, body: dict) -> bool:
    """True when vLLM's validation of `body` fails with something other than a validation
    error (pydantic's, or vLLM's own VLLMValidationError, which vLLM answers with a 400)."""
    from vllm.exceptions import VLLMValidationError

    try:
        model.model_validate(body)
    except (ValidationError, VLLMValidationError):
        return False
    except Exception:  # noqa: BLE001 - what we are looking for
        return True
    return False


def test_every_crash_of_vllms_validation_is_refused_by_a_named_rule():
    crashers, unrefused = set(), []
    for endpoint, (model, base) in _models().items():
        for field in sorted(model.model_fields):
            for value in WRONG_TYPES:
                for context in CONTEXTS:
                    body = {**base, **context, field: value}
                    if not _crashes(model, body):
                        continue
                    crashers.add((endpoint, field))
                    try:
                        prepare(body, ServerSettings(), chat=endpoint == "chat")
                    except RequestRejected as exc:
                        assert exc.param == field
                    else:
                        unrefused.append((endpoint, field, value, context))
    assert not unrefused
    # What vLLM 0.32 has: if this set changes, the rules' table is what to look at.
    assert crashers == {("chat", "structured_outputs"), ("chat", "messages"),
                        ("completion", "structured_outputs")}


@pytest.mark.parametrize("body,chat", [
    ({"model": "m", "prompt": "hi", "structured_outputs": {"json": {"type": "object"}}}, False),
    ({"model": "m", "prompt": "hi", "messages": 5}, False),  # not a /v1/completions field
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}],
      "structured_outputs": None}, True),
])
def test_the_rules_let_well_typed_fields_through(body, chat):
    assert prepare(body, ServerSettings(), chat=chat) is not None
