"""Train the shapes test bed: a LLaVA-1.5-architecture VLM that really answers questions.

    make shapes-model           # writes models/shapes-llava (about an hour on 2 cores)
    python -m benchmarks.shapes_model DIR [--preset full|ci] [--threads N]

The checkpoint is an ordinary `LlavaForConditionalGeneration` directory (CLIP-ViT/14-336: 576
patch tokens + [CLS], features from the penultimate layer, 2-layer MLP projector, Llama LM, a
byte-level BPE tokenizer and a CLIP image processor), so `idselect serve DIR` loads it like any
LLaVA-1.5 checkpoint. It is trained from seeds on the task of `benchmarks.make_shapes_dataset`,
whose generator makes every training image fresh (no image is seen twice), in two stages:

1. Vision tower. The ViT learns from dense labels at its feature layer (the penultimate one, the
   layer LLaVA-1.5 reads and whose [CLS] attention ID-Selection scores): a [CLS] head predicts
   which (shape, colour) pairs are present and how many shapes there are (so [CLS] attends to the
   objects), and a per-patch head predicts the colour and the shape of the object under each patch
   (so every patch of an object carries what it is, not only its edges).
2. Projector + language model, the tower frozen. Every image comes with each question the task
   can ask of it, packed into one sequence (each question sees the image and itself only, with
   the positions it would have alone), and the loss is on the answer word and `</s>`. The first
   half of the steps show all 576 patch tokens; after that, 60% of the steps show sparse subsets
   (in raster order, as the plugin keeps them): random ones and ones biased to object patches, K
   log-uniform in [8, 576]. A test bed must not confound "which tokens carry the answer" with
   "this LM has never seen fewer than 576 tokens": LLaVA-1.5 is not trained so, and
   docs/performance.md says what that means.

Progress shows as a bar with the loss; held-out accuracy per question kind (first answer token,
greedy, all 576 tokens) is printed as it goes, and at the end for K=16 with the patches that
cover the objects (the oracle) and with random patches. `idselect_training.json` in DIR keeps the
spec, that history and the wall time. Deterministic from the seed for a given machine and thread
count (CPU matmul reductions may differ across thread counts); a second run with the same spec
reuses DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from benchmarks.accuracy import SHORT_ANSWER  # the prompt the benchmark sends
from benchmarks.make_shapes_dataset import (
    COLORS,
    KINDS,
    MAX_OBJECTS,
    SHAPES,
    make_item,
    patch_coverage,
    questions,
)

GRID = 24  # patches per side
PATCHES = GRID * GRID
COLOR_NAMES = sorted(COLORS)
PAIRS = [(s, c) for s in SHAPES for c in COLOR_NAMES]
# A patch belongs to the object covering at least this share of it (else: background).
PATCH_OWNER_SHARE = 0.25


@dataclass(frozen=True)
class ShapesSpec:
    """Model sizes and the training schedule (the checkpoint directory records it)."""

    vision_hidden: int = 128
    vision_layers: int = 5  # the last one is never run: LLaVA-1.5 reads the penultimate layer
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 2
    vocab_size: int = 512
    vision_steps: int = 1500
    vision_batch: int = 16
    vision_lr: float = 1e-3
    lm_steps: int = 4000
    lm_batch: int = 16
    lm_lr: float = 2e-3
    # The LM sees all 576 tokens for the first `full_until` of its steps (it learns to read the
    # image), then a `full_share` of steps (it learns to read sparse subsets as well).
    full_until: float = 0.5
    full_share: float = 0.4
    eval_images: int = 300
    eval_every: int = 500
    seed: int = 0


PRESETS = {
    "full": ShapesSpec(),
    # The CI test bed: the same pipeline, small enough to train in under 3 minutes (it learns
    # counts well above image-blind answers; the other kinds stay near chance at this size).
    "ci": ShapesSpec(vision_hidden=64, vision_layers=3, vision_heads=1, text_hidden=64,
                     text_layers=3, text_heads=1, vision_steps=300, vision_batch=8,
                     vision_lr=2e-3, lm_steps=1000, lm_batch=8, lm_lr=3e-3, full_until=0.7,
                     eval_images=150, eval_every=10**9),
}


def corpus() -> list[str]:
    """Every prompt and answer of the task, so BPE makes each task word one token."""
    words = [*SHAPES, *COLOR_NAMES, "yes", "no", "left", "right", *map(str, range(10))]
    lines = [f"USER: What color is the {s}?\n{SHORT_ANSWER}\nASSISTANT: {c}</s>"
             for s in SHAPES for c in COLOR_NAMES]
    lines += [f"USER: What shape is the {c} object?\n{SHORT_ANSWER}\nASSISTANT: {s}</s>"
              for s in SHAPES for c in COLOR_NAMES]
    lines += [f"USER: How many shapes are there? ASSISTANT: {n}" for n in range(10)]
    lines += [f"USER: Is there a {c} {s}? ASSISTANT: yes no" for s in SHAPES for c in COLOR_NAMES]
    lines += [f"Is the {c} {s} left or right of the {c} {s}? left right"
              for s in SHAPES for c in COLOR_NAMES]
    return lines * 4 + [" ".join(words)] * 20


def user_prompt(tokenizer, question: str) -> tuple[list[int], list[int]]:
    """Token ids before and after the image, exactly as the OpenAI server renders one user turn
    (benchmarks/accuracy.py's prompt; chat prompts get no BOS beyond the template's)."""
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": f"{question}\n{SHORT_ANSWER}"}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    before, after = text.split("<image>")
    return (tokenizer(before, add_special_tokens=False)["input_ids"],
            tokenizer(after, add_special_tokens=False)["input_ids"])


def answer_ids(tokenizer, answer: str) -> list[int]:
    return tokenizer(" " + answer, add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]


# ------------------------------------------------------------------------------------ data


def pixels_of(images):
    """CLIP preprocessing of 336 x 336 images (resize and crop are identities at this size)."""
    import numpy as np
    import torch

    from idselect.tiny_checkpoint import CLIP_IMAGE_STATS

    array = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])
    x = torch.from_numpy(array).permute(0, 3, 1, 2)
    mean = torch.tensor(CLIP_IMAGE_STATS["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_IMAGE_STATS["image_std"]).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class Scene:
    objects: list  # make_shapes_dataset.Shape
    coverage: object  # (objects, 24, 24) numpy
    asked: dict  # kind -> (question, answer)


def scenes(rng: random.Random, n: int):
    images, out = [], []
    for _ in range(n):
        image, objects = make_item(rng)
        images.append(image)
        out.append(Scene(objects, patch_coverage(objects), questions(rng, objects)))
    return pixels_of(images), out


def vision_targets(batch: list[Scene]):
    """[CLS]: pair presence (multi-label) and count; patches: colour and shape (0 = none)."""
    import numpy as np
    import torch

    present = torch.zeros(len(batch), len(PAIRS))
    count = torch.tensor([len(s.objects) - 1 for s in batch])
    colour = torch.zeros(len(batch), PATCHES, dtype=torch.long)
    shape = torch.zeros(len(batch), PATCHES, dtype=torch.long)
    for b, scene in enumerate(batch):
        for o in scene.objects:
            present[b, PAIRS.index((o.shape, o.color))] = 1
        if scene.objects:
            cov = scene.coverage.reshape(len(scene.objects), PATCHES)
            owner, share = cov.argmax(0), cov.max(0)
            for p in np.nonzero(share >= PATCH_OWNER_SHARE)[0]:
                o = scene.objects[owner[p]]
                colour[b, p] = COLOR_NAMES.index(o.color) + 1
                shape[b, p] = SHAPES.index(o.shape) + 1
    return present, count, colour, shape


# ----------------------------------------------------------------------------------- model


def build(spec: ShapesSpec):
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from idselect.tiny_checkpoint import (
        CHAT_TEMPLATE,
        CLIP_IMAGE_STATS,
        IMAGE_TOKEN,
        TinyLlavaSpec,
        build_tokenizer,
        clip_and_llama_configs,
    )

    tokenizer = build_tokenizer(spec.vocab_size, corpus())
    sizes = TinyLlavaSpec(vision_hidden=spec.vision_hidden, vision_layers=spec.vision_layers,
                          vision_heads=spec.vision_heads, text_hidden=spec.text_hidden,
                          text_layers=spec.text_layers, text_heads=spec.text_heads,
                          vocab_size=spec.vocab_size, initializer_range=0.02, seed=spec.seed)
    vision, text = clip_and_llama_configs(sizes, tokenizer)
    config = LlavaConfig(
        vision_config=vision, text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        projector_hidden_act="gelu", vision_feature_select_strategy="default",
        vision_feature_layer=-2, image_seq_length=PATCHES, tie_word_embeddings=False,
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
            **CLIP_IMAGE_STATS),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def feature_layer(model, pixel_values):
    """The tower's penultimate-layer output ([CLS] first), as LLaVA-1.5 and vLLM read it."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)  # transformers 5 flattens CLIPVisionModel
    x = vm.pre_layrnorm(vm.embeddings(pixel_values))
    for layer in vm.encoder.layers[:-1]:
        x = layer(x, None)
    return x


class Packed:
    """One sequence per image: the text before the image, K projected patch features, then each
    question's tokens (and answer), each question seeing the image and itself only."""

    def __init__(self, model, tokenizer, features, batch: list[Scene], with_answers: bool):
        import torch

        embed = model.model.language_model.get_input_embeddings()
        before = None
        suffixes: list[list[tuple[list[int], int, str]]] = []  # (ids, answer start, kind)
        for scene in batch:
            rows = []
            for kind, (question, answer) in scene.asked.items():
                head, tail = user_prompt(tokenizer, question)
                before = head
                ids = tail + (answer_ids(tokenizer, answer) if with_answers else [])
                rows.append((ids, len(tail), kind, answer))
            suffixes.append(rows)
        b, k, _ = features.shape
        p = len(before)
        lengths = [sum(len(r[0]) for r in rows) for rows in suffixes]
        total = p + k + max(lengths)
        ids = torch.full((b, total), tokenizer.pad_token_id, dtype=torch.long)
        positions = torch.zeros(b, total, dtype=torch.long)
        positions[:, : p + k] = torch.arange(p + k)
        segment = torch.full((b, total), -1, dtype=torch.long)  # -1: shared prefix; -2: padding
        segment[:, p + k:] = -2
        ids[:, :p] = torch.tensor(before)
        self.targets: list[tuple[int, int, int, str, str]] = []  # (row, pos, token, kind, answer)
        for row, rows in enumerate(suffixes):
            at = p + k
            for q, (tokens, start, kind, answer) in enumerate(rows):
                n = len(tokens)
                ids[row, at:at + n] = torch.tensor(tokens)
                positions[row, at:at + n] = torch.arange(p + k, p + k + n)
                segment[row, at:at + n] = q
                if with_answers:
                    for j in range(start, n):  # the logits at j-1 predict token j
                        self.targets.append((row, at + j - 1, tokens[j], kind, answer))
                else:
                    self.targets.append((row, at + start - 1, -1, kind, answer))
                at += n
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        allowed = causal & ((key == -1) | (key == query))
        allowed |= torch.eye(total, dtype=torch.bool)  # padding rows attend to themselves
        embeds = embed(ids)
        image = model.model.multi_modal_projector(features)
        embeds = torch.cat([embeds[:, :p], image, embeds[:, p + k:]], dim=1)
        self.embeds, self.mask, self.positions = embeds, allowed[:, None], positions

    def logits(self, model):
        import torch

        out = model.model.language_model(inputs_embeds=self.embeds, attention_mask=self.mask,
                                         position_ids=self.positions)
        rows = torch.tensor([t[0] for t in self.targets])
        cols = torch.tensor([t[1] for t in self.targets])
        return model.lm_head(out.last_hidden_state[rows, cols])


def keep_indices(mode: str, k: int, batch: list[Scene], gen) -> list:
    """Patch indices (ascending) per image: all, random, biased to object patches, or the oracle
    (round-robin over the objects, each object's most-covered patches first)."""
    import torch

    out = []
    for scene in batch:
        if mode == "full" or k >= PATCHES:
            out.append(torch.arange(PATCHES))
            continue
        order = torch.randperm(PATCHES, generator=gen)
        if mode == "objects" and scene.objects:
            covered = torch.from_numpy(scene.coverage.reshape(len(scene.objects), -1).max(0))
            on = order[covered[order] >= PATCH_OWNER_SHARE]
            m = int(torch.randint(0, min(k, len(on)) + 1, (1,), generator=gen))
            rest = order[~torch.isin(order, on[:m])]
            order = torch.cat([on[:m], rest])
        elif mode == "oracle" and scene.objects:
            cov = torch.from_numpy(scene.coverage.reshape(len(scene.objects), -1))
            ranked = [c.argsort(descending=True, stable=True) for c in cov]
            picked: list[int] = []
            for rank in range(PATCHES):
                for r in ranked:
                    if len(picked) < k and int(r[rank]) not in picked:
                        picked.append(int(r[rank]))
                if len(picked) >= k:
                    break
            order = torch.tensor(picked)
        out.append(order[:k].sort().values)
    return out


def gather(features, keep: list):
    import torch

    return torch.stack([f[i] for f, i in zip(features, keep, strict=True)])


def first_answers(model, tokenizer, pixels, batch: list[Scene], keep_mode="full", k=PATCHES,
                  seed=0, chunk=25, keep: list | None = None) -> list[int]:
    """The greedy first answer token of each question, in order, seeing the patches `keep_mode`
    picks (see `keep_indices`), or the patch indices in `keep` (one ascending tensor per image)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    model.eval()
    with torch.inference_mode():
        for at in range(0, len(batch), chunk):
            part = batch[at:at + chunk]
            feats = feature_layer(model, pixels[at:at + chunk])[:, 1:]
            picked = (keep[at:at + chunk] if keep is not None
                      else keep_indices(keep_mode, k, part, gen))
            feats = gather(feats, picked)
            packed = Packed(model, tokenizer, feats, part, with_answers=False)
            out += packed.logits(model).argmax(-1).tolist()
    return out


def answers_right(model, tokenizer, pixels, batch: list[Scene], keep_mode="full", k=PATCHES,
                  seed=0) -> list[tuple[str, bool]]:
    """(kind, right?) per question, in order: is the greedy first answer token the answer's?
    (Every answer of the task is one token, then `</s>`.)"""
    asked = [(kind, answer) for scene in batch for kind, (_, answer) in scene.asked.items()]
    best = first_answers(model, tokenizer, pixels, batch, keep_mode, k, seed)
    return [(kind, token == answer_ids(tokenizer, answer)[0])
            for token, (kind, answer) in zip(best, asked, strict=True)]


def accuracy(model, tokenizer, pixels, batch: list[Scene], keep_mode="full", k=PATCHES,
             seed=0) -> dict[str, float]:
    """Held-out accuracy per kind (see `answers_right`)."""
    hits: dict[str, list[bool]] = {}
    for kind, right in answers_right(model, tokenizer, pixels, batch, keep_mode, k, seed):
        hits.setdefault(kind, []).append(right)
    return {kind: sum(hits[kind]) / len(hits[kind]) for kind in KINDS if kind in hits}


# -------------------------------------------------------------------------------- training


def schedule(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vision(model, spec: ShapesSpec, rng: random.Random, log) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    d = spec.vision_hidden
    heads = torch.nn.ModuleDict({
        "present": torch.nn.Linear(d, len(PAIRS)), "count": torch.nn.Linear(d, MAX_OBJECTS),
        "colour": torch.nn.Linear(d, len(COLOR_NAMES) + 1),
        "shape": torch.nn.Linear(d, len(SHAPES) + 1),
    })
    tower = model.model.vision_tower
    params = [*tower.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.vision_lr, weight_decay=0.01)
    tower.train()
    bar = tqdm(range(spec.vision_steps), desc="1/2 vision tower", file=sys.stderr,
               mininterval=2, dynamic_ncols=True)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = schedule(step, spec.vision_steps, spec.vision_lr)
        pixels, batch = scenes(rng, spec.vision_batch)
        present, count, colour, shape = vision_targets(batch)
        x = feature_layer(model, pixels)
        cls, patches = x[:, 0], x[:, 1:]
        on = colour > 0
        patch_loss = 0.0
        for name, target in (("colour", colour), ("shape", shape)):
            ce = F.cross_entropy(heads[name](patches).flatten(0, 1), target.flatten(),
                                 reduction="none").view_as(target)
            patch_loss = patch_loss + ce[on].mean() + 0.5 * ce[~on].mean()
        loss = (F.binary_cross_entropy_with_logits(heads["present"](cls), present)
                + F.cross_entropy(heads["count"](cls), count) + patch_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        log.setdefault("vision_loss", []).append(round(loss.item(), 4))
    tower.eval()


def train_language(model, tokenizer, spec: ShapesSpec, rng: random.Random, held_out, log,
                   ) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    params = [*model.model.multi_modal_projector.parameters(),
              *model.model.language_model.parameters(), *model.lm_head.parameters()]
    opt = torch.optim.AdamW(params, lr=spec.lm_lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(spec.seed)
    bar = tqdm(range(spec.lm_steps), desc="2/2 projector + LM", file=sys.stderr, mininterval=2,
               dynamic_ncols=True)
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = schedule(step, spec.lm_steps, spec.lm_lr)
        pixels, batch = scenes(rng, spec.lm_batch)
        with torch.no_grad():
            feats = feature_layer(model, pixels)[:, 1:]
        draw = torch.rand((), generator=gen).item()
        if step < spec.full_until * spec.lm_steps or draw < spec.full_share:
            mode, k = "full", PATCHES
        else:
            mode = "random" if draw < (1 + spec.full_share) / 2 else "objects"
            k = int(math.exp(torch.empty(()).uniform_(math.log(8), math.log(PATCHES),
                                                         generator=gen).item()))
        feats = gather(feats, keep_indices(mode, k, batch, gen))
        packed = Packed(model, tokenizer, feats, batch, with_answers=True)
        labels = torch.tensor([t[2] for t in packed.targets])
        loss = F.cross_entropy(packed.logits(model), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", k=k, refresh=False)
        log.setdefault("lm_loss", []).append(round(loss.item(), 4))
        if (step + 1) % spec.eval_every == 0 and step + 1 < spec.lm_steps:
            acc = accuracy(model, tokenizer, *held_out)
            log.setdefault("held_out", []).append({"step": step + 1, **acc})
            bar.write(f"step {step + 1}: held-out accuracy (576 tokens) "
                      + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), file=sys.stderr)
    model.eval()


def train(out_dir: str | Path, spec: ShapesSpec = PRESETS["full"], threads: int | None = None,
          ) -> Path:
    """Train (or reuse) the shapes model in `out_dir`; return the directory."""
    import torch

    from idselect.tiny_checkpoint import already_written, save_model

    out = Path(out_dir)
    spec_json = json.dumps({"model": "shapes-llava", **asdict(spec)}, sort_keys=True)
    if already_written(out, spec_json):
        print(f"{out}: already trained with this spec; reusing it", file=sys.stderr)
        return out
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    model, processor = build(spec)
    tokenizer = processor.tokenizer
    held_out = scenes(random.Random(f"shapes-held-out-{spec.seed}"), spec.eval_images)
    rng = random.Random(f"shapes-train-{spec.seed}")
    log: dict = {}
    train_vision(model, spec, rng, log)
    train_language(model, tokenizer, spec, rng, held_out, log)
    final = {
        "full": accuracy(model, tokenizer, *held_out),
        "oracle_16": accuracy(model, tokenizer, *held_out, keep_mode="oracle", k=16),
        "random_16": accuracy(model, tokenizer, *held_out, keep_mode="random", k=16),
    }
    for name, acc in final.items():
        print(f"held-out accuracy, {name}: " + " ".join(f"{k}={v:.2f}" for k, v in acc.items()),
              file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    report = {"spec": asdict(spec), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "wall_s": round(time.perf_counter() - started, 1),
              "held_out_images": spec.eval_images, "final": final,
              "held_out": log.get("held_out", []),
              "vision_loss_last": log["vision_loss"][-20:], "lm_loss_last": log["lm_loss"][-20:]}
    (out / "idselect_training.json").write_text(json.dumps(report, indent=2) + "\n")
    save_model(model, out, spec_json, processor)
    print(f"wrote {out} in {report['wall_s']:.0f}s", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--vision-steps", type=int, default=None)
    parser.add_argument("--lm-steps", type=int, default=None)
    args = parser.parse_args(argv)
    spec = replace(PRESETS[args.preset], seed=args.seed)
    if args.vision_steps is not None:
        spec = replace(spec, vision_steps=args.vision_steps)
    if args.lm_steps is not None:
        spec = replace(spec, lm_steps=args.lm_steps)
    train(args.directory, spec, args.threads)


if __name__ == "__main__":
    main()
