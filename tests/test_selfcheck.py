"""The start-up self-check catches the spawn trap: plugin in the front end only.

The negative case is reproduced for real in a child process: VLLM_PLUGINS excludes the entry
point, and the plugin is registered in the parent process only, as a naive integration would.
The front end then emits K placeholders while the spawned worker runs vLLM's stock LLaVA.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from idselect.vllm_plugin.selfcheck import PluginNotActiveError, check_inspections, expected_class

PLUGIN_MODEL_CLASS = "IDSelectLlavaForConditionalGeneration"


def test_expected_class_per_architecture():
    assert expected_class(["LlavaForConditionalGeneration"]) == PLUGIN_MODEL_CLASS
    with pytest.raises(PluginNotActiveError, match="does not support"):
        expected_class(["MllamaForConditionalGeneration"])


def test_check_accepts_plugin_model_everywhere():
    check_inspections([f"{PLUGIN_MODEL_CLASS}(\n  (vision_tower): ...)"] * 2, PLUGIN_MODEL_CLASS)


@pytest.mark.parametrize(
    "inspections",
    [[], ["LlavaForConditionalGeneration(\n ...)"], [f"{PLUGIN_MODEL_CLASS}(", "LlavaForCond("]],
)
def test_check_rejects_missing_or_stock_workers(inspections):
    with pytest.raises(PluginNotActiveError):
        check_inspections(inspections, PLUGIN_MODEL_CLASS)


SCRIPT = textwrap.dedent(
    """
    import sys
    from idselect.vllm_plugin import register
    from idselect.vllm_plugin.selfcheck import PluginNotActiveError, verify_offline

    if __name__ == "__main__":
        from vllm import LLM
        register()  # parent process only: spawned workers never see this
        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=2048)
        try:
            verify_offline(llm)
        except PluginNotActiveError as exc:
            print("CAUGHT:", exc)
            sys.exit(3)
        print("NOT CAUGHT")
    """
)


@pytest.mark.engine
def test_parent_only_registration_is_caught(tiny_model_dir, tmp_path):
    script = tmp_path / "trap.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "VLLM_PLUGINS": "none-but-this-name-matches-nothing"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "LlavaForConditionalGeneration" in proc.stdout
    assert "did not load in the worker processes" in proc.stdout
