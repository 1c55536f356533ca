"""One options value: validated once where it enters, then passed on as that value.

- Requests: the HTTP layer's `VisualOptions.parse` is the only validation; the processor takes
  the value from the request's scope and does not parse the request's kwargs again.
- Deployment settings: validated once at start-up; a bad flag, environment variable or
  `--hf-overrides` value stops `idselect serve` with a message naming it.
- The OpenAPI document's fields come from the same rules (`RequestFields`).
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from idselect.options import (
    BUDGET_KEY,
    IMPORTANCE_KEY,
    OPTION_KEYS,
    SELECTOR_KEY,
    OptionError,
    RequestFields,
    VisualOptions,
)
from tests.conftest import make_image

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=False)
    | st.sampled_from(["visual", "cls", "text", "unified", "topk", "id_select", "random", "16",
                       "pool", "divprune", ""]) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                 max_size=3),
    max_leaves=6,
)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(OPTION_KEYS), value=JSON)
def test_the_documented_schema_and_the_validator_agree(key, value):
    """JSON Schema cannot tell 16 from 16.0 (the validator refuses the float): the one gap."""
    if isinstance(value, float) and value.is_integer():
        return
    schema = RequestFields.json_schema_properties()[key]
    try:
        jsonschema.validate(value, schema)
        documented = True
    except jsonschema.ValidationError:
        documented = False
    try:
        VisualOptions.parse({key: value})
        accepted = True
    except OptionError as exc:
        assert exc.param == key
        accepted = False
    assert documented == accepted, (key, value)


_CLEAN = ("IDSELECT_VISUAL_TOKEN_BUDGET", "IDSELECT_MAX_VISUAL_TOKEN_BUDGET",
          "IDSELECT_VISUAL_TOKEN_SELECTOR", "IDSELECT_VISUAL_TOKEN_IMPORTANCE",
          "IDSELECT_SELECTION_BACKEND")
# (argv, environment, what the error must name); None: it parses.
CASES = [
    (["m", "--hf-overrides", json.dumps({"idselect_gamma": float("inf")})], {},
     ["--hf-overrides", "idselect_gamma", "finite"]),
    (["m", "--hf-overrides", '{"idselect_suppression": "add"}'], {},
     ["--hf-overrides", "idselect_suppression"]),
    (["m", "--hf-overrides", '{"visual_token_budget": 0}'], {},
     ["--hf-overrides", "visual_token_budget"]),
    (["m", "--visual-token-budget", "0"], {}, ["--visual-token-budget", ">= 1"]),
    (["m"], {"IDSELECT_VISUAL_TOKEN_BUDGET": "16.5"}, ["--visual-token-budget", "16.5"]),
    (["m"], {"IDSELECT_VISUAL_TOKEN_SELECTOR": "fastv"}, ["--visual-token-selector", "fastv"]),
    (["m"], {"IDSELECT_VISUAL_TOKEN_IMPORTANCE": "attention"},
     ["--visual-token-importance", "attention"]),
    (["m"], {"IDSELECT_SELECTION_BACKEND": "cuda"}, ["--selection-backend", "cuda"]),
    (["m", "--max-visual-token-budget", "0"], {}, ["--max-visual-token-budget", ">= 1"]),
    (["m"], {"IDSELECT_MAX_VISUAL_TOKEN_BUDGET": "many"}, ["--max-visual-token-budget", "many"]),
    (["m", "--visual-token-budget", "128", "--max-visual-token-budget", "64"], {},
     ["--visual-token-budget 128", "--max-visual-token-budget 64"]),
    (["m", "--visual-token-budget", "16", "--hf-overrides",
      '{"idselect_max_visual_token_budget": 8}'], {},
     ["--hf-overrides", "visual_token_budget 16", "idselect_max_visual_token_budget 8"]),
    (["m", "--visual-token-budget", "32", "--hf-overrides", '{"idselect_gamma": 80}'],
     {"IDSELECT_VISUAL_TOKEN_SELECTOR": "topk", "IDSELECT_MAX_VISUAL_TOKEN_BUDGET": "32"}, None),
]
_PARSE_ALL = """
import contextlib, io, json, os, sys
from server.serve import parse_args
CLEAN = json.loads(sys.argv[2])
out = []
for argv, env in json.loads(sys.argv[1]):
    for key in CLEAN:
        os.environ.pop(key, None)
    os.environ.update(env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parse_args(argv)
        out.append([0, ""])
    except SystemExit as exc:
        out.append([exc.code, err.getvalue()])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed() -> list[tuple[int, str]]:
    """`idselect serve`'s argument parsing of every case, in one interpreter."""
    done = subprocess.run([sys.executable, "-c", _PARSE_ALL,
                           json.dumps([[argv, env] for argv, env, _ in CASES]),
                           json.dumps(_CLEAN)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_bad_deployment_setting_stops_start_up_naming_it(parsed, case):
    code, stderr = parsed[case]
    names = CASES[case][2]
    if names is None:
        assert code == 0, stderr
        return
    assert code == 2
    for name in names:
        assert name in stderr, (name, stderr[-1500:])


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("IDSELECT_")}


def test_the_processor_takes_the_edges_value_and_does_not_parse_the_kwargs_again(
        tiny_model_dir):
    """Inside a request's scope the processor uses the options the HTTP layer validated: a
    budget there is applied even where the kwargs say otherwise, and kwargs it would refuse
    are not looked at. Without a scope (offline) the kwargs are where options enter."""
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs
    from vllm.plugins import load_general_plugins

    from idselect.vllm_plugin import usage
    from idselect.vllm_plugin.processing import OptionRefused

    load_general_plugins()
    processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(tiny_model_dir)))
    prompt = processor.info.get_tokenizer().encode("USER: <image>\nWhat? ASSISTANT:")

    def placeholders(kwargs: dict) -> int:
        items = processor.info.parse_mm_data({"image": [make_image(3)]})
        inputs = ProcessorInputs(prompt=prompt, mm_data_items=items,
                                 hf_processor_mm_kwargs=kwargs)
        out = processor.apply(inputs, timing_ctx=TimingContext(enabled=False))
        return out["mm_placeholders"]["image"][0].get_num_embeds()

    unparseable = {BUDGET_KEY: "sixteen", SELECTOR_KEY: 3}
    with usage.request(VisualOptions(budget=16, importance="text")) as scope:
        assert placeholders(unparseable) == 16
    assert scope.served == VisualOptions(16, "text", "id_select")
    assert [(i.original, i.kept) for i in scope.usage.images] == [(576, 16)]
    assert placeholders({BUDGET_KEY: 24, IMPORTANCE_KEY: "visual"}) == 24  # offline
    with pytest.raises(OptionRefused) as info:
        placeholders(unparseable)
    assert info.value.parameter == BUDGET_KEY


def test_the_metrics_directory_is_removed_when_the_server_exits(tmp_path):
    """Multiprocess metrics use a temporary directory unless the operator gave one; it goes
    when `idselect serve` exits (here: after --help)."""
    env = {**_clean_env(), "TMPDIR": str(tmp_path)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    code = ("import os, sys; from server.serve import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ['PROMETHEUS_MULTIPROC_DIR'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    used = done.stdout.strip().splitlines()[-1]
    assert used.startswith(str(tmp_path))
    assert list(tmp_path.iterdir()) == []
