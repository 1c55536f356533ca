"""Train the shapes test bed: a LLaVA-1.5-architecture VLM that really answers questions.

    make shapes-model           # writes models/shapes-llava (about 110 minutes on 2 cores)
    python -m testbed.model DIR [--preset full|ci] [--threads N] [--device cpu|cuda]

The checkpoint is an ordinary `LlavaForConditionalGeneration` directory (CLIP-ViT/14-336: 576
patch tokens + [CLS], features from the penultimate layer, 2-layer MLP projector, Llama LM, a
byte-level BPE tokenizer and a CLIP image processor), so `idselect serve DIR` loads it like any
LLaVA-1.5 checkpoint. It is trained from seeds on the task of `testbed.task`
(the data side is `testbed.data`, the packed reading of the model
`testbed.reading`), in two stages:

1. Vision tower (`testbed.tower`), on fresh images every step. The ViT learns from dense
   labels at its feature layer (the penultimate one, the layer LLaVA-1.5 reads and whose [CLS]
   attention ID-Selection scores): a [CLS] head predicts which (shape, colour) pairs are present
   and how many shapes there are (so [CLS] attends to the objects), and per-patch heads predict the
   colour, the shape and the horizontal position (centre-x bin and centre x) of the object under
   each patch, and which patch lies under an object's centre (so every patch of an object carries
   what and where it is, and each object has one patch that stands for it).
2. Projector + language model, the tower frozen, on a pool of `lm_pool` images whose features are
   computed once (each draw asks the image fresh questions). Every image comes with the questions
   the task can ask of it (`shapes_data.every_question`: each object's colour and shape, several
   pairs and relations, the count) and training-only drills (`shapes_data.centre_drills`: "Is the
   image centre left or right of the <colour> <shape>?"), all packed into one sequence (each
   question sees the image and itself only, with the positions it would have alone); the loss is on
   the answer words and `</s>`, plus half as much on the questions' own words, plus a linear head's
   reading of each patch's colour, shape and centre-patch mark from the projector's output
   (training only, so that the projector keeps colour and one mark per object to count by). The
   LM reads few tokens first: each object's centre patch (8 tokens)
   for a quarter of the steps, every object patch (128) for the next quarter, then all 576 in half
   of the steps and sparse subsets (in raster order, as the plugin keeps them: random ones and ones
   biased to object patches, K log-uniform in [8, 576]) in the rest. Why each piece is there is in
   docs/performance.md: with 576 tokens from the start and no drill, existence and relation stayed
   at chance. A test bed must not confound "which tokens carry the answer" with "this LM has never
   seen fewer than 576 tokens": LLaVA-1.5 is not trained so, and docs/performance.md says what that
   means.

Progress shows as a bar with the loss. As it goes, stage 1 prints what its heads read from the
feature layer of held-out images (per object patch: colour, shape, centre-x bin and error; centre
patches found; per image: count, all present pairs right) and stage 2 the held-out accuracy per
question kind (first answer token, greedy, all 576 tokens); at the end, the latter also for K=16
with the patches that cover the objects (the oracle) and with random patches.
`idselect_training.json` in DIR keeps the spec, that history and the wall time. Deterministic from
the seed for a given machine and thread count (CPU matmul reductions may differ across thread
counts); a second run with the same spec reuses DIR. Stage 1's result is kept beside DIR
(`DIR.stage1`), so a run that changes only stage 2's fields (`LANGUAGE_STAGE_FIELDS`) trains only
stage 2.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from testbed.data import (
    COLOR_NAMES,
    PATCHES,
    Scene,
    centre_drills,
    corpus,
    every_question,
    keep_indices,
    scenes,
    vision_targets,
)
from testbed.reading import Packed, accuracy, feature_layer, gather
from testbed.spec import PRESETS, ShapesSpec
from testbed.task import SHAPES
from testbed.tower import schedule, train_vision

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


# -------------------------------------------------------------------------------- training


def feature_pool(model, spec: ShapesSpec, rng: random.Random):
    """`spec.lm_pool` training images: their frozen-tower patch features (float16) and scenes."""
    import torch
    from tqdm import tqdm

    feats = torch.empty(spec.lm_pool, PATCHES, spec.vision_hidden, dtype=torch.float16,
                        device=model.device)
    pool: list[Scene] = []
    chunk = 32
    with torch.inference_mode():
        for at in tqdm(range(0, spec.lm_pool, chunk), desc="2/2 tower features", file=sys.stderr,
                       mininterval=2, dynamic_ncols=True):
            pixels, batch = scenes(rng, min(chunk, spec.lm_pool - at))
            feats[at:at + len(batch)] = feature_layer(model, pixels.to(model.device))[:, 1:].half()
            pool += batch
    return feats, pool


def reading(spec: ShapesSpec, step: int, gen) -> tuple[str, int]:
    """Which patches stage 2's step `step` reads: (`keep_indices` mode, K)."""
    import torch

    if step < spec.centres_until * spec.lm_steps:
        return "centres", 8
    if step < spec.objects_until * spec.lm_steps:
        return "object_patches", 128
    draw = torch.rand((), generator=gen).item()
    if draw < spec.full_share:
        return "full", PATCHES
    k = int(math.exp(torch.empty(()).uniform_(math.log(8), math.log(PATCHES), generator=gen)))
    return ("random" if draw < (1 + spec.full_share) / 2 else "objects"), k


def train_language(model, tokenizer, spec: ShapesSpec, rng: random.Random, held_out, log,
                   ) -> None:
    import torch
    from tqdm import tqdm

    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    pool_feats, pool = feature_pool(model, spec, rng)
    params = [*model.model.multi_modal_projector.parameters(),
              *model.model.language_model.parameters(), *model.lm_head.parameters()]
    # created only when used (it draws from torch's RNG)
    probe = (projector_probe(spec, model.device)
             if spec.projector_labels or spec.projector_centres else None)
    opt = torch.optim.AdamW(params + ([*probe.parameters()] if probe else []), lr=spec.lm_lr,
                            weight_decay=0.01)
    gen = torch.Generator().manual_seed(spec.seed)
    bar = tqdm(range(spec.lm_steps), desc="2/2 projector + LM", file=sys.stderr, mininterval=2,
               dynamic_ncols=True)
    for step in bar:
        model.train()
        for group in opt.param_groups:
            group["lr"] = schedule(step, spec.lm_steps, spec.lm_lr)
        drawn = torch.randint(0, len(pool), (spec.lm_batch,), generator=gen).tolist()
        batch = [replace(pool[i], drill=every_question(rng, pool[i].objects)
                         + centre_drills(rng, pool[i].objects, spec.centre_drills))
                 for i in drawn]
        mode, k = reading(spec, step, gen)
        feats = gather(pool_feats[drawn].float(), keep_indices(mode, k, batch, gen))
        packed = Packed(model, tokenizer, feats, batch, with_answers=True)
        loss, per_kind = packed.loss(model, spec.question_loss)
        if probe is not None:
            loss = loss + projector_label_loss(model, probe, spec, pool_feats[drawn], batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", k=k, refresh=False)
        log.setdefault("lm_loss", []).append(round(loss.item(), 4))
        for kind, value in per_kind.items():
            log.setdefault("lm_loss_by_kind", {}).setdefault(kind, []).append(round(value, 4))
        if (step + 1) % spec.eval_every == 0 and step + 1 < spec.lm_steps:
            acc = accuracy(model, tokenizer, *held_out)
            log.setdefault("held_out", []).append({"step": step + 1, **acc})
            bar.write(f"step {step + 1}: held-out accuracy (576 tokens) "
                      + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), file=sys.stderr)
    model.eval()


def projector_probe(spec: ShapesSpec, device="cpu"):
    """The training-only linear head of `projector_label_loss`: colour (or none), shape (or
    none) of the object under a patch, and whether the patch is an object's centre patch, from
    the projector's output."""
    import torch

    return torch.nn.Linear(spec.text_hidden, len(COLOR_NAMES) + len(SHAPES) + 3, device=device)


def projector_label_loss(model, probe, spec: ShapesSpec, features, batch: list[Scene]):
    """Cross-entropy of `probe` reading, from the projector's output of every patch, the colour
    and the shape of the object under it (0: none), weighted by `projector_labels`, plus
    `projector_centres` x the binary cross-entropy of its centre-patch mark."""
    import torch.nn.functional as F

    read = probe(model.model.multi_modal_projector(features.float())).flatten(0, 1)
    targets = {k: v.flatten().to(read.device)
               for k, v in vision_targets(batch, spec.position_bins).items()
               if k in ("colour", "shape", "centre")}
    colours, shapes = len(COLOR_NAMES) + 1, len(SHAPES) + 1
    labels = (F.cross_entropy(read[:, :colours], targets["colour"])
              + F.cross_entropy(read[:, colours:colours + shapes], targets["shape"]))
    centres = F.binary_cross_entropy_with_logits(read[:, -1], targets["centre"])
    return spec.projector_labels * labels + spec.projector_centres * centres


# The fields only stage 2 reads: a spec that differs from an earlier one in these alone reuses
# that run's trained tower (stage 1 is about a sixth of the full preset's 110 minutes).
LANGUAGE_STAGE_FIELDS = ("lm_steps", "lm_batch", "lm_lr", "lm_pool", "centres_until",
                         "objects_until", "full_share", "centre_drills", "question_loss",
                         "projector_labels", "projector_centres")


def vision_stage(model, spec: ShapesSpec, rng: random.Random, held_out, log, cache: Path) -> None:
    """Stage 1, or its result from `cache` (the tower's weights, its log and the RNG states that
    stage 2 goes on from) where a run with the same stage-1 fields wrote it: either way stage 2
    starts from the same state, so the checkpoint is the same."""
    import torch

    key = json.dumps({k: v for k, v in asdict(spec).items() if k not in LANGUAGE_STAGE_FIELDS},
                     sort_keys=True)
    tower = model.model.vision_tower
    if (cache / "key.json").exists() and (cache / "key.json").read_text() == key:
        saved = torch.load(cache / "stage1.pt", map_location="cpu", weights_only=False)
        tower.load_state_dict(saved["tower"])
        rng.setstate(saved["rng"])
        torch.set_rng_state(saved["torch_rng"])
        log.update(saved["log"])
        tower.eval()
        print(f"{cache}: reusing the vision tower trained with this stage-1 spec", file=sys.stderr)
        return
    train_vision(model, spec, rng, held_out, log)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save({"tower": tower.state_dict(), "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(), "log": log}, cache / "stage1.pt")
    (cache / "key.json").write_text(key)  # last: the marker


def train(out_dir: str | Path, spec: ShapesSpec = PRESETS["full"], threads: int | None = None,
          device: str = "cpu") -> Path:
    """Train (or reuse) the shapes model in `out_dir` on torch device `device`; return the
    directory. The data (images, questions, kept patches) come from the same seeded streams on
    any device; the weights match across devices only as far as their float reductions do."""
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
    model.to(device)  # initialised on the CPU from the seed, whatever the device
    tokenizer = processor.tokenizer
    held_out = scenes(random.Random(f"shapes-held-out-{spec.seed}"), spec.eval_images)
    rng = random.Random(f"shapes-train-{spec.seed}")
    log: dict = {}
    vision_stage(model, spec, rng, held_out, log, out.with_name(out.name + ".stage1"))
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
    model.to("cpu")
    report = {"spec": asdict(spec), "device": device_name(device),
              "threads": torch.get_num_threads(),
              "torch": torch.__version__, "wall_s": round(time.perf_counter() - started, 1),
              "held_out_images": spec.eval_images, "final": final,
              "vision_held_out": log["vision_held_out"], "held_out": log.get("held_out", []),
              "vision_loss_last": log["vision_loss"][-20:], "lm_loss_last": log["lm_loss"][-20:],
              "lm_loss_by_kind_last": {kind: losses[-20:] for kind, losses
                                       in log.get("lm_loss_by_kind", {}).items()}}
    (out / "idselect_training.json").write_text(json.dumps(report, indent=2) + "\n")
    save_model(model, out, spec_json, processor)
    print(f"wrote {out} in {report['wall_s']:.0f}s", file=sys.stderr)
    return out


def device_name(device: str) -> str:
    import torch

    d = torch.device(device)
    return torch.cuda.get_device_name(d) if d.type == "cuda" else d.type


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--device", default="cpu",
                        help="torch device to train on: cpu (default) or cuda[:N]")
    parser.add_argument("--vision-steps", type=int, default=None)
    parser.add_argument("--lm-steps", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device}: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device}: only cpu and cuda are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    spec = replace(PRESETS[args.preset], seed=args.seed)
    if args.vision_steps is not None:
        spec = replace(spec, vision_steps=args.vision_steps)
    if args.lm_steps is not None:
        spec = replace(spec, lm_steps=args.lm_steps)
    train(args.directory, spec, args.threads, args.device)


if __name__ == "__main__":
    main()
