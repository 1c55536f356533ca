"""The shapes test bed's data: prompts and answers as token ids, images as CLIP pixels, the
tower's dense training labels, and which patches a training or oracle step keeps.

The task itself (images, questions, answers, per-patch object coverage) is
`testbed.task`; the trainer is `testbed.model`, and the model is read
by `testbed.reading`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from benchmarks.accuracy import SHORT_ANSWER  # the prompt the benchmark sends
from testbed.task import (
    COLORS,
    PATCH,
    RELATION_MARGIN,
    SHAPES,
    SIZE,
    make_item,
    patch_coverage,
    questions,
    relation_pairs,
)

GRID = 24  # patches per side
PATCHES = GRID * GRID
COLOR_NAMES = sorted(COLORS)
PAIRS = [(s, c) for s in SHAPES for c in COLOR_NAMES]
# A patch belongs to the object covering at least this share of it (else: background).
PATCH_OWNER_SHARE = 0.25
# A training-only drill (never asked by the benchmark): the relation question with the image's
# vertical centre line in its first slot (see `centre_drills`).
CENTRE_QUESTION = "Is the image centre left or right of the {color} {shape}?"


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
    lines += [CENTRE_QUESTION.format(color=c, shape=s) + " left right"
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
    objects: list  # testbed.task.Shape
    coverage: object  # (objects, 24, 24) numpy
    asked: dict  # kind -> (question, answer)
    # Training only: every question asked of the image this draw, (kind, (question, answer)),
    # instead of one per kind (see `every_question`).
    drill: list | None = None


def every_question(rng: random.Random, objects, pairs_asked: int = 3) -> list:
    """(kind, (question, answer)) for the questions of the task with one answer on this image:
    the colour of each object whose shape is unique, the shape of each whose colour is unique,
    the count, up to `pairs_asked` present pairs and as many absent ones, and up to
    `pairs_asked` random ordered pairs far enough apart. Dense supervision for training: the
    benchmark asks one question at a time."""
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    out = [("color", (f"What color is the {o.shape}?", o.color))
           for o in objects if shapes.count(o.shape) == 1]
    out += [("shape", (f"What shape is the {o.color} object?", o.shape))
            for o in objects if colors.count(o.color) == 1]
    out.append(("count", ("How many shapes are there?", str(len(objects)))))
    present = sorted({(o.shape, o.color) for o in objects})
    yes = rng.sample(present, min(pairs_asked, len(present)))
    no = rng.sample(sorted(set(PAIRS) - set(present)), len(yes))
    out += [("exists", (f"Is there a {c} {s}?", answer))
            for (s, c), answer in [(p, "yes") for p in yes] + [(p, "no") for p in no]]
    pairs = relation_pairs(objects)
    for a, b in rng.sample(pairs, min(pairs_asked, len(pairs))):
        out.append(("relation", (
            f"Is the {a.color} {a.shape} left or right of the {b.color} {b.shape}?",
            "left" if a.centre_x < b.centre_x else "right")))
    rng.shuffle(out)
    return out


def centre_drills(rng: random.Random, objects, most: int = 4) -> list:
    """("centre", (question, answer)) for up to `most` objects at least half the relation margin
    from the vertical centre line: "Is the image centre left or right of the <colour> <shape>?".

    Why: a relation's answer flips with the order in which its two objects are named, so neither
    object alone says anything about it, and a small LM learning from scratch sits at chance on it
    (it did for 8,000 steps, even reading ideal patch features). This drill is the relation
    question with a fixed landmark in the first slot: its answer follows from where the object
    named in the second slot lies, which the LM learns at once; relations, which then need only
    the first slot's object as well, follow within a few hundred steps."""
    clear = [o for o in objects if abs(o.centre_x - SIZE / 2) >= RELATION_MARGIN / 2]
    return [("centre", (CENTRE_QUESTION.format(color=o.color, shape=o.shape),
                        "left" if o.centre_x > SIZE / 2 else "right"))
            for o in rng.sample(clear, min(most, len(clear)))]


def scenes(rng: random.Random, n: int):
    images, out = [], []
    for _ in range(n):
        image, objects = make_item(rng)
        images.append(image)
        out.append(Scene(objects, patch_coverage(objects), questions(rng, objects)))
    return pixels_of(images), out


def centre_patch(o) -> int:
    """The patch under the centre of an object's box (inside every shape of the task)."""
    x0, y0, x1, y1 = o.box
    row, col = int((y0 + y1) / 2 // PATCH), int((x0 + x1) / 2 // PATCH)
    return row * GRID + col


def vision_targets(batch: list[Scene], position_bins: int):
    """[CLS]: pair presence (multi-label) and count; patches: colour, shape, the bin of the
    object's centre x (0 = no object) and that centre x itself (-1 left edge .. 1 right edge),
    and which patches are an object's centre patch (`centre_patch`)."""
    import numpy as np
    import torch

    present = torch.zeros(len(batch), len(PAIRS))
    count = torch.tensor([len(s.objects) - 1 for s in batch])
    colour = torch.zeros(len(batch), PATCHES, dtype=torch.long)
    shape = torch.zeros(len(batch), PATCHES, dtype=torch.long)
    column = torch.zeros(len(batch), PATCHES, dtype=torch.long)
    centre_x = torch.zeros(len(batch), PATCHES)
    centre = torch.zeros(len(batch), PATCHES)
    for b, scene in enumerate(batch):
        for o in scene.objects:
            present[b, PAIRS.index((o.shape, o.color))] = 1
            centre[b, centre_patch(o)] = 1
        if scene.objects:
            cov = scene.coverage.reshape(len(scene.objects), PATCHES)
            owner, share = cov.argmax(0), cov.max(0)
            for p in np.nonzero(share >= PATCH_OWNER_SHARE)[0]:
                o = scene.objects[owner[p]]
                colour[b, p] = COLOR_NAMES.index(o.color) + 1
                shape[b, p] = SHAPES.index(o.shape) + 1
                column[b, p] = min(int(o.centre_x * position_bins / SIZE), position_bins - 1) + 1
                centre_x[b, p] = 2 * o.centre_x / SIZE - 1
    return {"present": present, "count": count, "colour": colour, "shape": shape,
            "column": column, "centre_x": centre_x, "centre": centre}


def keep_indices(mode: str, k: int, batch: list[Scene], gen) -> list:
    """`k` patch indices (ascending) per image: all (`full`), `random`, `objects` (a random
    number of object patches, the rest random), `centres` (each object's centre patch first),
    `object_patches` (object patches first), or the `oracle` (round-robin over the objects,
    each object's centre patch first, then its most-covered patches, nearest the centre among
    equals); where a mode's own picks are fewer than `k`, random patches fill up."""
    import torch

    out = []
    for scene in batch:
        if mode == "full" or k >= PATCHES:
            out.append(torch.arange(PATCHES))
            continue
        order = torch.randperm(PATCHES, generator=gen)
        if mode in ("centres", "objects", "object_patches") and scene.objects:
            if mode == "centres":
                first = torch.tensor(sorted({centre_patch(o) for o in scene.objects}))
            else:
                covered = torch.from_numpy(scene.coverage.reshape(len(scene.objects), -1).max(0))
                first = order[covered[order] >= PATCH_OWNER_SHARE]
                if mode == "objects":  # a random number of them
                    first = first[:int(torch.randint(0, min(k, len(first)) + 1, (1,),
                                                     generator=gen))]
            order = torch.cat([first, order[~torch.isin(order, first)]])
        elif mode == "oracle" and scene.objects:
            cov = torch.from_numpy(scene.coverage.reshape(len(scene.objects), -1))
            # Each object's centre patch first, then its most-covered patches (coverage comes in
            # steps of 1/196 and distances below that break ties only: among equally covered
            # patches, the one nearest the centre).
            rows, cols = torch.arange(PATCHES) // GRID, torch.arange(PATCHES) % GRID
            ranked = []
            for c, o in zip(cov, scene.objects, strict=True):
                centre = centre_patch(o)
                far = ((rows - centre // GRID) ** 2 + (cols - centre % GRID) ** 2).float().sqrt()
                key = c - far / (2 * GRID * PATCH * PATCH)
                key[centre] = 2.0  # above any coverage
                ranked.append(key.argsort(descending=True, stable=True))
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
