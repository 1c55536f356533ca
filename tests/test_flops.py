"""The FLOPs model against numbers worked out by hand (no engine)."""

from __future__ import annotations

import json

import pytest

from idselect import flops
from idselect.flops import (
    TextShape,
    VisionShape,
    image_prefill_reduction,
    llm_decode_flops,
    llm_prefill_flops,
    load_shape,
    predicted_ttft_speedup,
    report,
    shape_from_config,
    vision_encoder_flops,
)
from server.cli import main as cli

# A toy model small enough to count by hand: 28px images of 14px patches -> 4 patches + [CLS].
TOY = {
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "vision_config": {"hidden_size": 4, "intermediate_size": 8, "num_hidden_layers": 3,
                      "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
    "text_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
                    "vocab_size": 10},
}


def test_toy_shape_from_config():
    shape = shape_from_config(TOY)
    assert shape.vision == VisionShape(hidden=4, intermediate=8, layers_run=2, heads=2,
                                       image_size=28, patch_size=14)
    assert shape.vision.patches == 4 and shape.vision.sequence == 5
    assert shape.visual_tokens == 4
    assert shape.text == TextShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1,
                                   head_dim=4, vocab=10)


def test_toy_vision_encoder_by_hand():
    # patch embedding: 2 * 4 patches * (3*14*14 = 588) * 4 = 18816
    # per layer, 5 tokens: linear 2*5*(4*4*4 + 2*4*8) = 1280; attention 2*2*5*5*4 = 400
    # 2 layers run (feature layer -2 of 3): 2 * 1680 = 3360
    assert vision_encoder_flops(shape_from_config(TOY).vision) == 18816 + 3360


def test_toy_language_model_by_hand():
    t = shape_from_config(TOY).text
    # per token per layer: q 8*8, k+v 2*8*4, o 8*8, mlp 3*8*16 = 64 + 64 + 64 + 384 = 576
    assert t.linear_flops_per_token == 2 * 2 * 576 == 2304
    assert t.lm_head_flops == 2 * 8 * 10 == 160
    # prefill of 3 tokens: causal pairs 1+2+3 = 6; attention 2 layers * 2*2 * 2 heads * 4 * 6
    assert llm_prefill_flops(t, 3) == 3 * 2304 + 2 * 4 * 2 * 4 * 6 + 160 == 7456
    # one decoded token seeing 5 positions: 2304 + 2 * 4 * 2 * 4 * 5 + 160
    assert llm_decode_flops(t, 5) == 2304 + 320 + 160


def test_toy_report_and_speedup_by_hand():
    shape = shape_from_config(TOY)
    full, pruned = report(shape, None, text_tokens=2), report(shape, 1, text_tokens=2)
    assert (full.visual_tokens, pruned.visual_tokens) == (4, 1)
    # projector 2 * tokens * (4*8 + 8*8) = 192 per token
    assert (full.projector, pruned.projector) == (4 * 192, 192)
    # selection: scores 2*4*4 = 32 plus the 4 x 4 similarity matrix 2*4*4*4 = 128; none at full
    assert (full.selection, pruned.selection) == (0, 160)
    # LM prefill: 6 tokens (pairs 21) vs 3 tokens (pairs 6); attention 64 FLOPs per pair
    assert full.llm_prefill == 6 * 2304 + 64 * 21 + 160 == 15328
    assert pruned.llm_prefill == 7456
    # image-attributable: minus the 2 text tokens alone (2 * 2304 + 64 * 3 + 160 = 4960)
    assert (full.llm_prefill_image, pruned.llm_prefill_image) == (15328 - 4960, 7456 - 4960)
    encoder = 18816 + 3360
    assert full.prefill_total == encoder + 768 + 15328
    assert pruned.prefill_total == encoder + 160 + 192 + 7456
    assert predicted_ttft_speedup(shape, 1, text_tokens=2) == pytest.approx(
        (encoder + 768 + 15328) / (encoder + 160 + 192 + 7456)
    )
    assert predicted_ttft_speedup(shape, None) == 1.0
    assert report(shape, 999).visual_tokens == 4  # a budget above N keeps everything


def test_llava_15_7b_hand_numbers():
    shape = load_shape("llava-1.5-7b")
    assert shape.visual_tokens == 576 and shape.vision.layers_run == 23
    # 2 * 32 layers * (4 * 4096^2 + 3 * 4096 * 11008) = 2 * 32 * 202,375,168
    assert shape.text.linear_flops_per_token == 12_952_010_752
    # patch embedding 2*576*588*1024 + 23 layers * (2*577*12,582,912 + 4*577^2*1024)
    assert vision_encoder_flops(shape.vision) == 693_633_024 + 23 * (
        14_520_680_448 + 1_363_677_184
    ) == 366_033_858_560


def test_paper_arithmetic_576_to_16_cuts_image_prefill_by_more_than_97_percent():
    shape = load_shape("llava-1.5-7b")
    # By hand, 64 text tokens: attention costs 2*2*32*128*32 layers = 524,288 FLOPs per
    # (query, key) pair; K image tokens after 64 text tokens add 64K + K(K+1)/2 pairs.
    per_pair = 524_288
    image_16 = 16 * 12_952_010_752 + (64 * 16 + 16 * 17 // 2) * per_pair
    image_576 = 576 * 12_952_010_752 + (64 * 576 + 576 * 577 // 2) * per_pair
    assert report(shape, 16).llm_prefill_image == image_16 == 207_840_346_112
    assert report(shape, None).llm_prefill_image == image_576 == 7_566_809_628_672
    cut = image_prefill_reduction(shape, 16)
    assert cut == pytest.approx(1 - image_16 / image_576)
    assert cut > 0.97 and cut > 1 - 16 / 576  # attention terms shrink faster than linear ones
    for text_tokens in (0, 16, 256, 1024):
        assert image_prefill_reduction(shape, 16, text_tokens) > 0.97


def test_predicted_speedups_grow_as_the_budget_shrinks_and_stay_below_the_encoder_bound():
    for name in ("llava-1.5-7b", "realistic-cpu"):
        shape = load_shape(name)
        speedups = [predicted_ttft_speedup(shape, k) for k in (None, 192, 128, 64, 32, 16)]
        assert speedups[0] == 1.0
        assert speedups == sorted(speedups)
        full = report(shape, None)
        bound = full.prefill_total / (full.encoder + llm_prefill_flops(shape.text, 64))
        assert speedups[-1] < bound
    # The encoder is a small share of LLaVA-1.5-7B's prefill but about half of the CPU model's.
    big, small = report(load_shape("llava-1.5-7b"), None), report(load_shape("realistic-cpu"), None)
    assert big.encoder / big.prefill_total < 0.05
    assert 0.4 < small.encoder / small.prefill_total < 0.55
    assert predicted_ttft_speedup(load_shape("llava-1.5-7b"), 64) == pytest.approx(4.33, abs=0.01)
    assert predicted_ttft_speedup(load_shape("realistic-cpu"), 64) == pytest.approx(1.76, abs=0.01)


def test_load_shape_from_sparse_hub_config_fills_hugging_face_defaults(tmp_path):
    # llava-hf/llava-1.5-7b-hf leaves most Llama sizes to LlamaConfig's defaults.
    config = {
        "architectures": ["LlavaForConditionalGeneration"],
        "text_config": {"model_type": "llama", "vocab_size": 32064},
        "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                          "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14},
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    from_dir, from_file = load_shape(tmp_path), load_shape(tmp_path / "config.json")
    preset = load_shape("llava-1.5-7b")
    assert from_dir.vision == from_file.vision == preset.vision
    assert from_dir.text == preset.text


def test_feature_layer_list_and_full_strategy():
    config = {**TOY, "vision_feature_layer": [-3, -1], "vision_feature_select_strategy": "full"}
    shape = shape_from_config(config)
    assert shape.vision.layers_run == 3
    assert shape.visual_tokens == 5  # [CLS] kept


def test_tiny_model_config_loads(tiny_model_dir):
    shape = load_shape(tiny_model_dir)
    assert shape.visual_tokens == 576
    assert shape.text.head_dim == 64 and shape.vision.layers_run == 2


def test_unknown_model_is_an_error():
    with pytest.raises(FileNotFoundError, match="preset"):
        load_shape("no-such-model")


def test_cli_prints_a_table(capsys):
    cli(["flops", "--budget", "64", "16"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip().split(" ")[0] in
            ("full", "64", "16")]
    assert [r[0] for r in rows] == ["full", "64", "16"]
    assert rows[2][7] == "97.3%"  # image-attributable LM prefill cut at K=16
    assert rows[1][-1] == "4.32x"
    assert "llava-1.5-7b" in out


def test_cli_json_and_config_path(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(flops.REALISTIC_CPU))
    cli(["flops", "--model", str(tmp_path / "config.json"), "--budget", "64", "--json",
         "--text-tokens", "17"])
    data = json.loads(capsys.readouterr().out)
    assert [r["budget"] for r in data["rows"]] == [None, 64]
    assert data["rows"][1]["visual_tokens"] == 64 and data["rows"][1]["text_tokens"] == 17
    assert data["rows"][1]["predicted_ttft_speedup"] > 1.5


def test_cli_other_commands_still_listed(capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "serve MODEL" in out and "tiny-model DIR" in out and "flops" in out
