"""Coverage-guided fuzzing (atheris / libFuzzer) of the edge code that parses client values:
a short seeded run per target (tests/edge_fuzz_targets.py), and the inputs the fuzzers found
kept as regression cases. No server; each target runs in its own process (libFuzzer exits the
process on a crash).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.request.openai_rules import check_chat_request
from server.request.options import prepare
from server.request.rejected import RequestRejected
from server.settings import ServerSettings

pytestmark = pytest.mark.slow  # libFuzzer runs, one process per target: ~40 s

ROOT = Path(__file__).resolve().parents[1]
RUNS = 100_000
SEED = 16
# Edges each target must reach, so a run that instruments nothing (or stops early) fails.
MIN_COVERAGE = {"request_options": 80, "json_body": 80, "media_url": 30, "address": 15,
                "inline_image": 10}


def fuzz(target: str, tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    return subprocess.run(
        [sys.executable, "-m", "tests.edge_fuzz_targets", target, str(corpus), f"-seed={SEED}",
         f"-artifact_prefix={tmp_path}/", "-max_len=4096", "-timeout=20", *options],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("target", sorted(MIN_COVERAGE))
def test_target_survives_a_seeded_run(target, tmp_path):
    run = fuzz(target, tmp_path, f"-runs={RUNS}")
    output = run.stdout + run.stderr
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("crash-"))
    assert run.returncode == 0 and not crashes, output[-4000:]
    assert f"Done {RUNS} runs" in output, output[-2000:]
    coverage = int(re.findall(r"DONE\s+cov: (\d+)", output)[-1])
    assert coverage >= MIN_COVERAGE[target], output[-2000:]


def test_a_crash_fails_the_run(tmp_path):
    """The harness reports what it finds: a target that raises exits non-zero with the input."""
    run = fuzz("harness_selftest", tmp_path, "-runs=10")
    assert run.returncode != 0
    assert "harness self-test crash" in run.stdout + run.stderr
    crash = [p for p in tmp_path.iterdir() if p.name.startswith("crash-")]
    assert len(crash) == 1 and crash[0].read_bytes().startswith(b"crash")


# What the fuzzers found (schema fuzzing and the field-by-field comparison with OpenAI), kept as
# inputs to the pure rules: each must be refused with a 400 naming the field, not reach vLLM.
FOUND = [
    # vLLM answered 500 (AssertionError in its image parser) and reset the connection
    ({"messages": [{"role": "user", "content": [
        {"type": "image_pil", "image_pil": "data:image/png;base64,AAAA"}]}]},
     "messages[0].content[0].type"),
    # schemathesis: answered 200 with choices[0].message.role == "tool" (OpenAI: "assistant")
    ({"messages": [{"role": "tool", "tool_call_id": "", "content": ""}],
      "add_generation_prompt": False}, "add_generation_prompt"),
    ({"messages": [{"role": "user", "content": ""}, {"role": "developer", "content": "x"}],
      "add_generation_prompt": False}, "add_generation_prompt"),
    # an image part without "type": vLLM loads the image, the usage counted none
    ({"messages": [{"role": "user", "content": [{"image_url": "data:image/png;base64,AAAA"}]}]},
     "messages[0].content[0].type"),
    # schemathesis: 500 "Failed to apply prompt replacement" (truncation cut the image tokens)
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "x"}]}], "truncate_prompt_tokens": 1}, "truncate_prompt_tokens"),
    # schemathesis: 500 ZeroDivisionError in vLLM's beam search score (seq_len ** -6e16 == 0)
    ({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True,
      "length_penalty": -6.471734866310722e16}, "length_penalty"),
    ({"messages": [{"role": "user", "content": "x"}], "use_beam_search": True,
      "length_penalty": 1e300}, "length_penalty"),
    # schemathesis: 500 from the engine's msgpack serialisation (beyond uint64)
    ({"messages": [{"role": "user", "content": "x"}], "stream_interval": 32589158477190044731},
     "stream_interval"),
    ({"messages": [{"role": "user", "content": "x"}], "top_k": -(2**63) - 1}, "top_k"),
    # the same failure for nested integers (vLLM's encoder refuses them in SamplingParams)
    ({"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [1, 2**64]},
     "stop_token_ids[1]"),
    ({"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"json": {
        "type": "integer", "minimum": -(2**63) - 1}}}, "structured_outputs.json.minimum"),
]


@pytest.mark.parametrize("body,param", FOUND, ids=[p for _, p in FOUND])
def test_found_inputs_are_refused_by_the_rules(body, param):
    with pytest.raises(RequestRejected) as raised:
        body = json.loads(json.dumps(body))
        check_chat_request(body)
        prepare(body, ServerSettings())
    assert raised.value.param == param


def test_beam_search_keeps_sane_length_penalties():
    for penalty in (-10, -1.5, 0, 1.0, 10):
        body = {"messages": [{"role": "user", "content": "x"}], "use_beam_search": True,
                "length_penalty": penalty}
        check_chat_request(body)
        assert prepare(body, ServerSettings()) is not None


# What atheris found in our own code (2,000,000-run seeded runs, see docs/robustness.md).
def test_a_part_type_that_is_not_a_string_is_no_crash():
    """request_options: `{"type": []}` in a /v1/completions body's messages raised TypeError
    (unhashable list) in the image count: a 500 through the server."""
    body = {"prompt": "x", "messages": [{"role": "user", "content": [{"type": []}, {"type": {}}]}]}
    assert prepare(body, ServerSettings(), chat=False) is not None
    with pytest.raises(RequestRejected):  # the chat rules refuse it before looking for images
        check_chat_request(body)


def test_images_matter_only_in_chat_bodies():
    """A /v1/completions body carries no images: `messages` there must not trigger the
    image-only rule (truncation through an image's tokens)."""
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    body = {"prompt": "x", "messages": [{"role": "user", "content": [part, part]}],
            "truncate_prompt_tokens": 4}
    assert prepare(body, ServerSettings(), chat=False) is not None
    with pytest.raises(RequestRejected) as raised:
        prepare(body, ServerSettings())
    assert raised.value.param == "truncate_prompt_tokens"


def test_a_huge_integer_under_an_empty_key_names_no_param():
    """json_body: `{"": 22212222222222222222}` was refused with param "" (now null)."""
    with pytest.raises(RequestRejected) as raised:
        prepare({"": 22212222222222222222}, ServerSettings())
    assert raised.value.param is None and "engine's integer range" in str(raised.value)
