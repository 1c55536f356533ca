"""The trained test bed, fast: the CI preset of `testbed.model` (the same two-stage
pipeline on a smaller model, under 3 minutes on 2 cores) must learn above what the best
image-blind answer gets (on counts, what it learns at that size), its checkpoint must serve
through `idselect serve` with the answers transformers gives on the same weights, and the selector
path must change what it answers.
The full-size model and its accuracy figures are a benchmark (`make accuracy`), not a test."""

from __future__ import annotations

import hashlib
import json
import math
import random
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch

from benchmarks.accuracy import SHORT_ANSWER, normalize_answer
from benchmarks.bench_common import image_url_for
from devtools.launch import TINY_MODEL_ARGS, running_server
from testbed import data as shapes_data
from testbed import model as sm
from testbed import reading as shapes_reading
from testbed.task import KINDS, write_dataset

CI = sm.PRESETS["ci"]


@pytest.fixture(scope="module")
def ci_model(request, tmp_path_factory) -> Path:
    """Trained once per version of the test bed's code and torch: reruns and other pytest runs
    (the fast lane's, a single module's) use this checkpoint from pytest's cache folder (`make
    clean` removes it); without pytest's cache plugin it is trained in this run's temp folder."""
    sources = sorted(Path(sm.__file__).parent.glob("*.py"))
    key = hashlib.sha256(repr((CI, torch.__version__)).encode())
    for source in sources:
        key.update(source.read_bytes())
    name = f"testbed-ci-{key.hexdigest()[:16]}"
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    folder = cache.mkdir(name) if cache else tmp_path_factory.mktemp(name)
    model = folder / "shapes-ci"
    if not (model / "idselect_training.json").is_file():
        partial = folder / "partial"
        shutil.rmtree(partial, ignore_errors=True)
        sm.train(partial, CI)
        shutil.rmtree(model, ignore_errors=True)
        partial.rename(model)
    return model


@pytest.fixture(scope="module")
def held_out():
    return shapes_data.scenes(random.Random("test-held-out"), 300)


def _blind_best(scenes, kind: str) -> float:
    """The share the best image-blind answer gets on `kind`: its most frequent answer there."""
    answers = Counter(s.asked[kind][1] for s in scenes if kind in s.asked)
    return answers.most_common(1)[0][1] / sum(answers.values())


def _binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p): the one-sided exact test's p-value."""
    return sum(math.comb(n, j) * p**j * (1 - p) ** (n - j) for j in range(hits, n + 1))


@pytest.mark.slow  # trains the CI preset: ~6 minutes on 2 cores, ~10 on one beside other tests
@pytest.mark.timeout(1800)  # the training is its fixture's setup, which counts towards the limit
def test_ci_model_learns_above_image_blind_answers(ci_model, held_out):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    # Stage 1: the tower's patch features carry each object patch's colour (7 colours; its head
    # reads them on held-out images, recorded in the checkpoint's training report).
    heads = json.loads((ci_model / "idselect_training.json").read_text())["vision_held_out"]
    assert heads[-1]["step"] == CI.vision_steps and heads[-1]["patch_colour"] > 0.8, heads
    model = LlavaForConditionalGeneration.from_pretrained(ci_model).eval()
    tokenizer = AutoProcessor.from_pretrained(ci_model).tokenizer
    pixels, scenes = held_out
    answered = shapes_reading.answers_right(model, tokenizer, pixels, scenes)
    by_kind = {k: [r for kind, r in answered if kind == k] for k in KINDS}
    # At CI size the model learns to count (the other kinds stay near chance: see the preset).
    right, blind = by_kind["count"], _blind_best(scenes, "count")
    pvalue = _binomial_tail(sum(right), len(right), blind)
    summary = {k: round(sum(v) / len(v), 2) for k, v in by_kind.items()}
    assert sum(right) / len(right) > blind and pvalue < 1e-3, (summary, blind, pvalue)
    # It reads the image: which 16 patches it sees changes its answers.
    oracle = shapes_reading.answers_right(model, tokenizer, pixels, scenes, "oracle", 16)
    rand = shapes_reading.answers_right(model, tokenizer, pixels, scenes, "random", 16)
    assert oracle != rand


def test_training_is_deterministic(tmp_path):
    quick = replace(CI, vision_steps=3, lm_steps=3, eval_images=4, lm_pool=64)

    def digest(path: Path) -> str:
        return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()

    first, second = sm.train(tmp_path / "a", quick), sm.train(tmp_path / "b", quick)
    assert digest(first) == digest(second)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    assert sm.train(first, quick) == first  # same spec: reused, not retrained
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    # A spec that changes stage 2 only retrains stage 2, from the kept tower, into the checkpoint
    # a run from scratch writes.
    tower = first.with_name("a.stage1") / "stage1.pt"
    tower_mtime = tower.stat().st_mtime_ns
    longer = replace(quick, lm_steps=4, lm_lr=1e-3)
    assert digest(sm.train(first, longer)) == digest(sm.train(tmp_path / "c", longer))
    assert tower.stat().st_mtime_ns == tower_mtime
    assert digest(first) != digest(second)


def test_device_flag_is_checked_before_any_training(tmp_path, capsys):
    import torch

    for device, why in [("meta", "only cpu and cuda are supported"),
                        ("nonsense", "--device nonsense:")]:
        with pytest.raises(SystemExit) as exited:
            sm.main([str(tmp_path / "m"), "--device", device])
        assert exited.value.code == 2 and why in capsys.readouterr().err
    if not torch.cuda.is_available():  # the CI machines: a clear refusal, not a CUDA trace
        with pytest.raises(SystemExit):
            sm.main([str(tmp_path / "m"), "--device", "cuda"])
        assert "torch sees no CUDA device here" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.engine
def test_served_ci_model_answers_as_trained_and_selectors_change_answers(ci_model, tmp_path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    data = write_dataset(tmp_path / "shapes", items=30, seed=7)
    items = [json.loads(line) for line in data.read_text().splitlines()]
    model = LlavaForConditionalGeneration.from_pretrained(ci_model).eval()
    tokenizer = AutoProcessor.from_pretrained(ci_model).tokenizer

    def ask(client, item, extra):
        body = {"model": str(ci_model), "temperature": 0, "max_tokens": 1, **extra,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url",
                     "image_url": {"url": image_url_for(item["image"], data.parent)}},
                    {"type": "text", "text": f"{item['question']}\n{SHORT_ANSWER}"}]}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()

    selectors = ("id_select", "topk", "divprune", "random", "pool")
    with running_server(ci_model, tmp_path / "server.log", *TINY_MODEL_ARGS) as server, \
            httpx.Client(base_url=server.base_url, timeout=120) as client:
        full = [ask(client, item, {}) for item in items]
        pruned = {s: [ask(client, item, {"visual_token_budget": 8, "visual_token_selector": s})
                      for item in items] for s in selectors}

    # The served checkpoint is the trained one: the greedy first token is transformers' (one
    # token asked for: content is that token, decoded without special tokens).
    from PIL import Image

    scenes = [shapes_data.Scene([], None, {item["kind"]: (item["question"], item["answers"][0])})
              for item in items]
    pixels = shapes_data.pixels_of(
        [Image.open(data.parent / i["image"]).convert("RGB") for i in items])
    expected = shapes_reading.first_answers(model, tokenizer, pixels, scenes)
    served = [normalize_answer(r["choices"][0]["message"]["content"]) for r in full]
    assert served == [normalize_answer(tokenizer.decode([t], skip_special_tokens=True))
                      for t in expected]

    for s in selectors:
        assert {r["usage"]["visual_tokens_kept"] for r in pruned[s]} == {8}
    answers = {s: [r["choices"][0]["message"]["content"] for r in pruned[s]] for s in selectors}
    assert len({tuple(a) for a in answers.values()}) > 1, answers  # selectors differ
    assert any(answers[s] != [r["choices"][0]["message"]["content"] for r in full]
               for s in selectors)
