"""What idselect does on the vLLM in this process, recorded for comparison across releases.

Run as `python -m tests.release_probe MODELS_DIR OUT_DIR` under one vLLM (this venv's 0.32, or a
newer release's Python layer first on PYTHONPATH: devtools/vllm_releases.py);
tests/test_vllm_releases.py compares what each release records with 0.32's. It records:

- `modules`: every runtime module of idselect and server, imported (or the error);
- `hooks`: where each compat hook was found (`compat.hooks_report`);
- `cli`: `idselect serve` parsing a command line into vLLM's and idselect's settings;
- `processors`: per backbone, per case (budget none / 16 / 64 / 100000, and a prompt-aware one),
  two images of different sizes through the plugin's multimodal processor: prompt ids,
  placeholders, the per-image fields the model reads, and the usage reported;
- `models`: per backbone, the model class vLLM builds (weights loaded from the tiny checkpoint),
  whether the M-RoPE recompute path is on where the runners read it, and the embedding step's
  output per case (saved as tensors in OUT_DIR/embeddings.pt).

vLLM 0.34's x86 CPU platform refuses a config without triton-cpu (which exists for no PyPI
torch); its check is answered True while a config is built here, and only then: nothing below
runs a Triton kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pkgutil
import socket
import sys
import traceback
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("PROMETHEUS_MULTIPROC_DIR", "")  # metrics in this process only
if not os.environ["PROMETHEUS_MULTIPROC_DIR"]:
    del os.environ["PROMETHEUS_MULTIPROC_DIR"]

import torch  # noqa: E402

from devtools.tiny_internvl import write_tiny_internvl  # noqa: E402
from devtools.tiny_llava_next import write_tiny_llava_next  # noqa: E402
from devtools.tiny_qwen2_5_vl import write_tiny_qwen2_5_vl  # noqa: E402
from devtools.tiny_qwen3_vl import write_tiny_qwen3_vl  # noqa: E402
from idselect.tiny_checkpoint import write_tiny_llava  # noqa: E402
from tests.conftest import make_image  # noqa: E402

RUNTIME_PACKAGES = ("idselect", "server")
# backbone -> (test-model writer, the second image's size: another token count than 224 x 224)
BACKBONES = {
    "llava": (write_tiny_llava, (336, 336)),
    "llava-next": (write_tiny_llava_next, (448, 308)),
    "qwen2.5-vl": (write_tiny_qwen2_5_vl, (448, 308)),
    "qwen3-vl": (write_tiny_qwen3_vl, (448, 308)),
    "internvl": (write_tiny_internvl, (900, 500)),
}
# case -> the request's mm_processor_kwargs
CASES = {
    "none": {},
    "16": {"visual_token_budget": 16},
    "64": {"visual_token_budget": 64},
    "100000": {"visual_token_budget": 100000},
    "16-unified": {"visual_token_budget": 16, "visual_token_importance": "unified"},
}
QUESTION = "What is in the image?"
CLI = ["MODEL", "--visual-token-budget", "32", "--visual-token-selector", "topk",
       "--max-model-len", "4096", "--port", "8123", "--dtype", "float32"]


def write_models(models_dir: Path) -> dict[str, Path]:
    return {name: write(models_dir / name) for name, (write, _) in BACKBONES.items()}


def _error() -> str:
    return traceback.format_exc(limit=-3).strip().splitlines()[-1]


def probe_modules() -> dict[str, str]:
    out = {}
    for package in RUNTIME_PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            try:
                importlib.import_module(name)
                out[name] = "ok"
            except Exception:  # noqa: BLE001 - recorded, compared by the test
                out[name] = _error()
    return out


def probe_cli() -> dict[str, object]:
    from server import serve

    args = serve.parse_args(CLI)
    kept = serve._adopt_idselect_options(args)
    return {
        "model": args.model, "port": args.port, "max_model_len": args.max_model_len,
        "dtype": args.dtype, "hf_overrides": args.hf_overrides,
        "trust_request_mm_kwargs": args.trust_request_mm_kwargs,
        "middleware": args.middleware, "limit_mm_per_prompt": args.limit_mm_per_prompt,
        "shutdown_timeout": args.shutdown_timeout,
        "mm_processor_cache_gb": args.mm_processor_cache_gb,
        "kept": {**kept, "settings": kept["settings"].describe()},
        "help_has_budget": "--visual-token-budget" in serve.build_parser().format_help(),
    }


@contextlib.contextmanager
def _config_without_triton_check():
    import vllm.triton_utils as triton_utils

    saved = triton_utils.HAS_TRITON
    triton_utils.HAS_TRITON = True
    try:
        yield
    finally:
        triton_utils.HAS_TRITON = saved


def vllm_config(model_dir: Path):
    from vllm.config import DeviceConfig, ModelConfig, VllmConfig

    model_config = ModelConfig(model=str(model_dir), dtype="float32",
                               limit_mm_per_prompt={"image": 2, "video": 0})
    with _config_without_triton_check():
        return VllmConfig(model_config=model_config, device_config=DeviceConfig("cpu"))


def _prompt_ids(tokenizer, images: int) -> list[int]:
    parts = [{"type": "image"}] * images + [{"type": "text", "text": QUESTION}]
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=True,
        return_dict=False))


def _tensor_data(value) -> object:
    data = getattr(value, "data", value)
    return data.tolist() if isinstance(data, torch.Tensor) else data


def process(processor, size: tuple[int, int], kwargs: dict):
    """Two images (224 x 224 and `size`) through the processor; what it decided, and the items."""
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from idselect.options import VisualOptions
    from idselect.vllm_plugin import usage

    images = [make_image(1, (224, 224)), make_image(2, size)]
    items = processor.info.parse_mm_data({"image": images})
    inputs = ProcessorInputs(prompt=_prompt_ids(processor.info.get_tokenizer(), 2),
                             mm_data_items=items, hf_processor_mm_kwargs=dict(kwargs))
    # As `idselect serve` does: the options validated once, handed over in the request's scope.
    with usage.request(VisualOptions.parse(kwargs)) as scope:
        out = processor.apply(inputs, timing_ctx=TimingContext(enabled=False))
    used = scope.usage
    mm_items = out["mm_kwargs"]["image"]
    record = {
        "prompt_token_ids": list(out["prompt_token_ids"]),
        "placeholders": [[p.offset, p.length, p.get_num_embeds()]
                         for p in out["mm_placeholders"]["image"]],
        "fields": [{k: _tensor_data(v) for k, v in sorted(item.items())
                    if k.startswith("idselect_")} for item in mm_items],
        "usage": [[i.original, i.kept, i.bucket] for i in used.images],
    }
    return record, mm_items


def _init_distributed(config) -> None:
    """A one-process "group" (gloo), as a model worker has, for the model's parallel layers."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        initialize_model_parallel(1, 1)


def _position_readers(config, model) -> dict[str, str]:
    """Whether each runner that reads the pruning switch after building a model would turn the
    M-RoPE recompute path on for this one (0.34: the V2 GPU and CPU runners' pruner factory)."""
    out = {"config": str(config.model_config.multimodal_config.is_multimodal_pruning_enabled())}
    for name in ("vllm.v1.worker.gpu.model_states.mm_pruning", "vllm.v1.worker.cpu.mm_pruning"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        pruner = module.maybe_create_mm_pruner(config.model_config, model, object(), object())
        out[name] = type(pruner).__name__
    return out


def probe_backbone(name: str, model_dir: Path, embeddings: dict) -> tuple[dict, dict]:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader import get_model
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.utils import group_and_batch_mm_kwargs

    config = vllm_config(model_dir)
    processor = MULTIMODAL_REGISTRY.create_processor(config.model_config)
    size = BACKBONES[name][1]
    processed, items = {}, {}
    for case, kwargs in CASES.items():
        processed[case], items[case] = process(processor, size, kwargs)
    _init_distributed(config)
    with set_current_vllm_config(config):
        model = get_model(vllm_config=config)
    model_record = {"class": type(model).__name__,
                    "positions": (_position_readers(config, model)
                                  if hasattr(model, "recompute_mrope_positions") else None)}
    for case in CASES:
        outputs = []
        batches = group_and_batch_mm_kwargs([("image", i) for i in items[case]], device="cpu")
        for _modality, _n, kwargs in batches:
            with set_current_vllm_config(config), torch.no_grad():
                outputs.extend(t.detach().clone() for t in model.embed_multimodal(**kwargs))
        embeddings[f"{name}/{case}"] = outputs
        with set_current_vllm_config(config), torch.no_grad():
            embeddings.update(_llm_inputs(f"{name}/{case}", model, processed[case],
                                          items[case], outputs))
    del model
    return processed, model_record


def _llm_inputs(key: str, model, processed: dict, items: list, embeds: list) -> dict:
    """What the model runner makes of the embeddings: M-RoPE positions (Qwen-VL family: laid
    out before the encoder, then rewritten from the kept tokens' channels, as the runner's
    pruning path does) and the LLM's input rows for the whole prompt."""
    from vllm.multimodal.inputs import MultiModalFeatureSpec, PlaceholderRange

    ids = processed["prompt_token_ids"]
    out = {}
    if hasattr(model, "recompute_mrope_positions"):
        features = [
            MultiModalFeatureSpec(data=item, modality="image", identifier=f"{key}/{i}",
                                  mm_position=PlaceholderRange(offset=p[0], length=p[1]))
            for i, (item, p) in enumerate(zip(items, processed["placeholders"], strict=True))
        ]
        positions, delta = model.get_mrope_input_positions(ids, features)
        embeds, positions, recomputed = model.recompute_mrope_positions(
            ids, embeds, positions, num_computed_tokens=0)
        out[f"positions/{key}"] = [positions, torch.tensor([delta, recomputed])]
    mask = torch.zeros(len(ids), dtype=torch.bool)
    token = torch.tensor(ids)
    for offset, length, _ in processed["placeholders"]:
        # structure tokens around an image (InternVL's <img> ... </img>) stay text
        mask[offset:offset + length] = torch.isin(token[offset:offset + length],
                                                  torch.tensor(_embed_token_ids(model)))
    out[f"llm-input/{key}"] = [model.embed_input_ids(token, embeds, is_multimodal=mask)]
    return out


def _embed_token_ids(model) -> list[int]:
    config = model.config
    ids = [getattr(config, name, None) for name in
           ("image_token_index", "image_token_id", "img_context_token_id")]
    return [i for i in ids if isinstance(i, int)]


def main(models_dir: Path, out_dir: Path) -> None:
    import vllm

    from idselect.vllm_plugin import compat

    out_dir.mkdir(parents=True, exist_ok=True)
    result: dict[str, object] = {"vllm": vllm.__version__, "modules": probe_modules()}
    result["hooks"] = compat.hooks_report()
    result["cli"] = probe_cli()
    models = write_models(models_dir)
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    result["processors"], result["models"] = {}, {}
    embeddings: dict[str, list[torch.Tensor]] = {}
    for name, model_dir in models.items():
        result["processors"][name], result["models"][name] = probe_backbone(
            name, model_dir, embeddings)
    torch.save(embeddings, out_dir / "embeddings.pt")
    (out_dir / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
