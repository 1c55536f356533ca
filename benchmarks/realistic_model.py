"""A LLaVA-1.5-architecture model with realistic proportions, for CPU measurements.

The tiny test model (`idselect tiny-model`) has a 3-layer, 128-wide tower and a 2-layer language
model: its timings are all overhead. This one has the real vision tower of LLaVA-1.5 and a small
but realistically shaped Llama language model, so the split of work between the encoder and the
language model, and what pruning saves, can be measured on a CPU:

- vision tower: CLIP-ViT-L/14-336 (0.30 B parameters): 24 layers of width 1024, 16 heads, MLP
  4096, 577 tokens ([CLS] + 576 patches); 23 layers run (`vision_feature_layer=-2`).
- projector: LLaVA-1.5's 2-layer GELU MLP, 1024 -> 1024 -> 1024 (narrowed to the LM width).
- language model: Llama, 24 layers of width 1024, 16 heads of 64 (no GQA), SwiGLU MLP 2816,
  vocabulary 32064: 0.37 B parameters (0.31 B without the embedding and LM head).

LLaVA-1.5-7B has the same tower and a Vicuna-7B language model (32 layers, width 4096, MLP 11008).
Here the language model costs ~0.62 GFLOPs per token instead of ~13, so the encoder is about half
of a full-budget prefill (vs ~5% on LLaVA-1.5-7B): pruning can at most halve the time to first
token here, and the FLOPs model (`idselect flops --model PATH/config.json`) predicts how much.

No weights are written: serve it with `--load-format dummy` (vLLM fills the weights with small
random values; the cost of every matmul is what it would be with real weights). The tokenizer,
chat template and image processor are the tiny model's (byte-level BPE, 453 tokens); the
language model's vocabulary is 32064 rows as in LLaVA-1.5, so the LM head costs what it really
does. The answers are gibberish; ids beyond the tokenizer decode to nothing.

    python -m benchmarks.realistic_model DIR      # writes DIR (config, tokenizer, processor)
    idselect serve DIR --load-format dummy --dtype bfloat16 --max-model-len 2048 ...
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bf16 where the CPU computes it natively (AVX-512 BF16), else fp32: without it vLLM's CPU
    bf16 path took ~70 s per request of this model (2-core AMD EPYC, 2026-12-07)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        return "float32"
    return "bfloat16" if "avx512_bf16" in flags else "float32"


# vLLM options the benchmarks use for this model on a CPU host.
SERVE_ARGS = (
    "--load-format", "dummy",
    "--dtype", cpu_dtype(),
    "--max-model-len", "2048",
    "--max-num-seqs", "4",
)


@dataclass(frozen=True)
class RealisticSpec:
    vision_hidden: int = 1024
    vision_intermediate: int = 4096
    vision_layers: int = 24
    vision_heads: int = 16
    text_hidden: int = 1024
    text_intermediate: int = 2816
    text_layers: int = 24
    text_heads: int = 16
    text_kv_heads: int = 16
    text_head_dim: int = 64
    vocab_size: int = 32064
    max_position_embeddings: int = 4096


_SKIP = {"model.safetensors", "idselect_tiny_spec.json"}
MARKER = "idselect_realistic_spec.json"


def write_realistic_llava(out_dir: str | Path, spec: RealisticSpec = RealisticSpec()) -> Path:
    """Write the model directory (no weights) and return its path; idempotent per spec."""
    from idselect.tiny_checkpoint import write_tiny_llava

    out = Path(out_dir)
    marker = out / MARKER
    spec_json = json.dumps(asdict(spec), sort_keys=True)
    if marker.exists() and marker.read_text() == spec_json:
        return out
    out.mkdir(parents=True, exist_ok=True)
    # Tokenizer, chat template, image processor and the config skeleton come from the tiny model.
    with tempfile.TemporaryDirectory(prefix="idselect-realistic-") as tmp:
        tiny = write_tiny_llava(Path(tmp) / "tiny")
        for path in tiny.iterdir():
            if path.name not in _SKIP:
                shutil.copy(path, out / path.name)
    config = json.loads((out / "config.json").read_text())
    config["vision_config"].update(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_intermediate,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        projection_dim=768,
        initializer_range=0.02,
    )
    config["text_config"].update(
        hidden_size=spec.text_hidden,
        intermediate_size=spec.text_intermediate,
        num_hidden_layers=spec.text_layers,
        num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads,
        head_dim=spec.text_head_dim,
        vocab_size=spec.vocab_size,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=0.02,
    )
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    marker.write_text(spec_json)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default="models/realistic-llava")
    args = parser.parse_args(argv)
    print(write_realistic_llava(args.directory))


if __name__ == "__main__":
    main()
