"""Generate a small synthetic VQA set: coloured shapes on a plain background, with questions.

    python -m benchmarks.make_shapes_dataset out/shapes --items 200 [--seed 0]

Writes DIR/images/NNNN.png (336x336) and DIR/data.jsonl, one line per question in the format
`benchmarks/accuracy.py` reads:

    {"id": "0007-color", "image": "images/0007.png", "question": "What color is the square?",
     "answers": ["red", "red", ...]}

Each image holds 1-3 shapes (square, circle, triangle), each shape kind at most once and each
colour at most once, at random positions and sizes, so every question has one right answer:
- "What color is the <shape>?" -> the colour;
- "What shape is the <colour> object?" -> square / circle / triangle;
- "How many shapes are there?" -> 1 / 2 / 3;
- "Is there a <shape> in the image?" -> yes / no.
Answers come as lists of 10 (as in VQAv2) so VQA accuracy (min(matches / 3, 1)) applies.
The small shapes (some only ~40 px) make the set sensitive to which visual tokens are kept.
Nothing large is committed: the set is generated when needed.
"""

from __future__ import annotations

import argparse
import json
import random
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
SIZE = 336


def _draw(draw, shape: str, box: tuple[int, int, int, int], color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=color)
    elif shape == "circle":
        draw.ellipse(box, fill=color)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=color)


def _place(rng: random.Random, taken: list[tuple[int, int, int, int]]):
    """A box that does not overlap the boxes already placed (best effort)."""
    for _ in range(200):
        side = rng.randint(40, 110)
        x0, y0 = rng.randint(4, SIZE - side - 4), rng.randint(4, SIZE - side - 4)
        box = (x0, y0, x0 + side, y0 + side)
        if all(box[2] + 6 < b[0] or b[2] + 6 < box[0] or box[3] + 6 < b[1] or b[3] + 6 < box[1]
               for b in taken):
            return box
    return None


def make_item(rng: random.Random):
    """One image and its objects: [(shape, colour name)]."""
    from PIL import Image, ImageDraw

    background = tuple(rng.randint(225, 255) for _ in range(3))
    image = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(image)
    count = rng.randint(1, 3)
    shapes = rng.sample(SHAPES, count)
    colors = rng.sample(sorted(COLORS), count)
    objects, boxes = [], []
    for shape, color in zip(shapes, colors, strict=True):
        box = _place(rng, boxes)
        if box is None:
            continue
        boxes.append(box)
        _draw(draw, shape, box, COLORS[color])
        objects.append((shape, color))
    return image, objects


def questions(rng: random.Random, objects: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(kind, question, answer) for one image."""
    shape, color = rng.choice(objects)
    present = {s for s, _ in objects}
    asked = rng.choice(SHAPES)
    return [
        ("color", f"What color is the {shape}?", color),
        ("shape", f"What shape is the {color} object?", shape),
        ("count", "How many shapes are there?", str(len(objects))),
        ("exists", f"Is there a {asked} in the image?", "yes" if asked in present else "no"),
    ]


def write_dataset(out_dir: str | Path, items: int, seed: int = 0,
                  per_image: int | None = None) -> Path:
    """Write `items` questions (cycling through the kinds over images); return data.jsonl."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines: list[dict] = []
    index = 0
    while len(lines) < items:
        image, objects = make_item(rng)
        name = f"images/{index:04d}.png"
        image.save(out / name)
        qs = questions(rng, objects)
        # Default: one question per image, the kinds in turn.
        qs = qs[:per_image] if per_image is not None else [qs[index % len(qs)]]
        for kind, question, answer in qs:
            if len(lines) < items:
                lines.append({"id": f"{index:04d}-{kind}", "image": name, "question": question,
                              "answers": [answer] * 10, "kind": kind})
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
