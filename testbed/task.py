"""Generate the shapes VQA task: coloured shapes on a plain or textured background, with questions.

    python -m testbed.task out/shapes --items 1000 [--seed 0]

The task is fixed, so anyone can generate fresh held-out questions (another seed):
- 336 x 336 RGB images; a background, plain or textured (light stripes or noise);
- 1-6 shapes from {square, circle, triangle} in {red, green, blue, yellow, purple, orange,
  black}, each (shape, colour) pair at most once, at random non-overlapping positions, sizes
  from 24 px up; optionally grey distractor clutter (small lines and dots, never counted);
- questions, exactly: "What color is the <shape>?", "What shape is the <colour> object?",
  "How many shapes are there?", "Is there a <colour> <shape>?", "Is the <colour> <shape> left or
  right of the <colour> <shape>?"; answers are one lowercase word (numbers as digits). A
  question is asked only where it has one right answer (a shape present in one colour only, a
  colour on one object only, two objects clearly apart horizontally).

Writes DIR/images/NNNN.png and DIR/data.jsonl, one line per question in the format
`benchmarks/accuracy.py` reads, plus each image's objects (for oracle selections):

    {"id": "0007-color", "image": "images/0007.png", "question": "What color is the square?",
     "answers": ["red", ...], "kind": "color",
     "objects": [{"shape": "square", "color": "red", "box": [x0, y0, x1, y1]}, ...]}

Answers come as lists of 10 (as in VQAv2) so VQA accuracy (min(matches / 3, 1)) applies.
Nothing large is committed: the set is generated when needed.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 170),
    "orange": (250, 140, 10),
    "black": (10, 10, 10),
}
SHAPES = ("square", "circle", "triangle")
KINDS = ("color", "shape", "count", "exists", "relation")
SIZE = 336
MIN_SIDE, MAX_SIDE = 24, 96
MAX_OBJECTS = 6
# Centres at least this far apart horizontally for a left/right question.
RELATION_MARGIN = 24


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2

    def as_dict(self) -> dict:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}


def _draw(draw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _apart(box, taken, gap: int = 6) -> bool:
    return all(box[2] + gap < b[0] or b[2] + gap < box[0] or box[3] + gap < b[1]
               or b[3] + gap < box[1] for b in taken)


def _place(rng: random.Random, taken: list[tuple[int, int, int, int]], low: int, high: int):
    """A box that does not overlap the boxes already placed (None if none was found)."""
    for _ in range(200):
        side = rng.randint(low, high)
        x0, y0 = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
        box = (x0, y0, x0 + side, y0 + side)
        if _apart(box, taken):
            return box
    return None


def _background(rng: random.Random):
    from PIL import Image, ImageDraw

    base = tuple(rng.randint(215, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), base)
    style = rng.choice(("plain", "stripes", "noise"))
    draw = ImageDraw.Draw(image)
    if style == "stripes":
        shade = tuple(max(0, c - rng.randint(12, 28)) for c in base)
        step = rng.randint(10, 28)
        for offset in range(-SIZE, SIZE, step):
            draw.line([(offset, 0), (offset + SIZE, SIZE)], fill=shade, width=step // 3)
    elif style == "noise":
        for _ in range(900):
            x, y = rng.randrange(SIZE), rng.randrange(SIZE)
            shade = tuple(max(0, c - rng.randint(8, 30)) for c in base)
            draw.rectangle((x, y, x + 3, y + 3), fill=shade)
    return image, draw


def make_item(rng: random.Random, clutter: bool | None = None):
    """One image and its shapes, in drawing order."""
    image, draw = _background(rng)
    every_pair = [(s, c) for s in SHAPES for c in sorted(COLORS)]
    pairs = rng.sample(every_pair, rng.randint(1, MAX_OBJECTS))
    objects: list[Shape] = []
    for shape, color in pairs:
        box = _place(rng, [o.box for o in objects], MIN_SIDE, MAX_SIDE)
        if box is None:
            continue
        _draw(draw, shape, box, COLORS[color])
        objects.append(Shape(shape, color, box))
    if clutter is None:
        clutter = rng.random() < 0.5
    if clutter:
        taken = [o.box for o in objects]
        for _ in range(rng.randint(3, 10)):  # grey lines and dots, never touching a shape
            box = _place(rng, taken, 4, 14)
            if box is None:
                break
            grey = (rng.randint(110, 170),) * 3
            if rng.random() < 0.5:
                draw.line([box[:2], box[2:]], fill=grey, width=2)
            else:
                draw.ellipse(box, fill=grey)
            taken.append(box)
    return image, objects


PATCH = 14  # the CLIP-ViT/14 patch; 24 x 24 patches per image


def patch_coverage(objects: list[dict] | list[Shape], patch: int = PATCH):
    """(objects, rows, cols) array: the share of each patch's pixels that each object covers
    (objects as `Shape`s or as the dicts in data.jsonl), drawn exactly as the image drew them."""
    import numpy as np
    from PIL import Image, ImageDraw

    out = np.zeros((len(objects), SIZE // patch, SIZE // patch), dtype=np.float32)
    for i, o in enumerate(objects):
        o = o if isinstance(o, Shape) else Shape(o["shape"], o["color"], tuple(o["box"]))
        mask = Image.new("L", (SIZE, SIZE), 0)
        _draw(ImageDraw.Draw(mask), o.shape, o.box, 1)
        pixels = np.asarray(mask, dtype=np.float32)
        out[i] = pixels.reshape(SIZE // patch, patch, SIZE // patch, patch).mean(axis=(1, 3))
    return out


def relation_pairs(objects: list[Shape]) -> list[tuple[Shape, Shape]]:
    """Ordered pairs of objects far enough apart in x for "left or right of" to have one answer."""
    return [(a, b) for a in objects for b in objects
            if a is not b and abs(a.centre_x - b.centre_x) >= RELATION_MARGIN]


def questions(rng: random.Random, objects: list[Shape]) -> dict[str, tuple[str, str]]:
    """kind -> (question, answer) for one image, for every kind with one right answer."""
    out: dict[str, tuple[str, str]] = {"count": ("How many shapes are there?", str(len(objects)))}
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    single_shape = [o for o in objects if shapes.count(o.shape) == 1]
    if single_shape:
        o = rng.choice(single_shape)
        out["color"] = (f"What color is the {o.shape}?", o.color)
    single_color = [o for o in objects if colors.count(o.color) == 1]
    if single_color:
        o = rng.choice(single_color)
        out["shape"] = (f"What shape is the {o.color} object?", o.shape)
    present = {(o.shape, o.color) for o in objects}
    shape, color = rng.choice(SHAPES), rng.choice(sorted(COLORS))
    if rng.random() < 0.5:
        shape, color = rng.choice(sorted(present))
    out["exists"] = (f"Is there a {color} {shape}?", "yes" if (shape, color) in present else "no")
    pairs = relation_pairs(objects)
    if pairs:
        a, b = rng.choice(pairs)
        out["relation"] = (
            f"Is the {a.color} {a.shape} left or right of the {b.color} {b.shape}?",
            "left" if a.centre_x < b.centre_x else "right",
        )
    return out


def write_dataset(out_dir: str | Path, items: int, seed: int = 0,
                  per_image: int | None = None) -> Path:
    """Write `items` questions (one per image by default, the kinds in turn); return data.jsonl."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines: list[dict] = []
    index = 0
    while len(lines) < items:
        image, objects = make_item(rng)
        asked = questions(rng, objects)
        if per_image is None:  # the next kind in turn that this image can answer
            wanted = KINDS[index % len(KINDS)]
            kinds = [wanted] if wanted in asked else []
        else:
            kinds = [k for k in KINDS if k in asked][:per_image]
        if not kinds:
            continue  # the same image is not kept: the kinds stay balanced
        name = f"images/{index:04d}.png"
        image.save(out / name)
        for kind in kinds:
            if len(lines) < items:
                question, answer = asked[kind]
                lines.append({"id": f"{index:04d}-{kind}", "image": name, "question": question,
                              "answers": [answer] * 10, "kind": kind,
                              "objects": [o.as_dict() for o in objects]})
        index += 1
    path = out / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory")
    parser.add_argument("--items", type=int, default=200, help="questions to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-image", type=int, default=None,
                        help="questions per image (default: one, kinds in turn)")
    args = parser.parse_args(argv)
    print(write_dataset(args.directory, args.items, args.seed, args.per_image))


if __name__ == "__main__":
    main()
