"""The shapes VQA task (benchmarks/make_shapes_dataset.py) is the one issue 15 fixes.

Every question matches one of the five templates, has one right answer (recomputed here from the
image's objects), every answer is one lowercase word, objects obey the task's rules, the shapes
are really drawn where the records say, and a seed fixes everything.
"""

from __future__ import annotations

import json
import random
import re

from PIL import Image

from benchmarks.make_shapes_dataset import (
    COLORS,
    KINDS,
    MAX_OBJECTS,
    MIN_SIDE,
    RELATION_MARGIN,
    SHAPES,
    SIZE,
    make_item,
    questions,
    write_dataset,
)

SHAPE = "(square|circle|triangle)"
COLOR = f"({'|'.join(COLORS)})"
TEMPLATES = {
    "color": re.compile(f"What color is the {SHAPE}\\?"),
    "shape": re.compile(f"What shape is the {COLOR} object\\?"),
    "count": re.compile("How many shapes are there\\?"),
    "exists": re.compile(f"Is there a {COLOR} {SHAPE}\\?"),
    "relation": re.compile(f"Is the {COLOR} {SHAPE} left or right of the {COLOR} {SHAPE}\\?"),
}


def _answer(kind: str, match: re.Match, objects: list[dict]) -> str:
    if kind == "count":
        return str(len(objects))
    if kind == "color":
        (o,) = [o for o in objects if o["shape"] == match[1]]  # exactly one such shape
        return o["color"]
    if kind == "shape":
        (o,) = [o for o in objects if o["color"] == match[1]]
        return o["shape"]
    if kind == "exists":
        return "yes" if any((o["color"], o["shape"]) == (match[1], match[2])
                            for o in objects) else "no"
    (a,) = [o for o in objects if (o["color"], o["shape"]) == (match[1], match[2])]
    (b,) = [o for o in objects if (o["color"], o["shape"]) == (match[3], match[4])]
    ax, bx = (a["box"][0] + a["box"][2]) / 2, (b["box"][0] + b["box"][2]) / 2
    assert abs(ax - bx) >= RELATION_MARGIN
    return "left" if ax < bx else "right"


def test_questions_follow_the_templates_and_have_one_right_answer(tmp_path):
    path = write_dataset(tmp_path / "shapes", items=200, seed=11)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 200
    assert {line["kind"] for line in lines} == set(KINDS)
    for line in lines:
        match = TEMPLATES[line["kind"]].fullmatch(line["question"])
        assert match, line["question"]
        answers = set(line["answers"])
        assert len(answers) == 1 and len(line["answers"]) == 10
        (answer,) = answers
        assert re.fullmatch("[a-z0-9]+", answer)
        assert answer == _answer(line["kind"], match, line["objects"]), line
    assert write_dataset(tmp_path / "again", items=200, seed=11).read_text() == path.read_text()
    assert write_dataset(tmp_path / "other", items=200, seed=12).read_text() != path.read_text()


def test_objects_obey_the_rules_and_are_drawn_where_recorded():
    rng = random.Random(5)
    counts, clutter_seen = set(), False
    for _ in range(150):
        image, objects = make_item(rng)
        assert isinstance(image, Image.Image) and image.size == (SIZE, SIZE)
        assert image.mode == "RGB"
        assert 1 <= len(objects) <= MAX_OBJECTS
        counts.add(len(objects))
        assert len({(o.shape, o.color) for o in objects}) == len(objects)
        for o in objects:
            assert o.shape in SHAPES and o.color in COLORS
            x0, y0, x1, y1 = o.box
            assert x1 - x0 >= MIN_SIDE and y1 - y0 >= MIN_SIDE
            # A point every shape covers: the centre (square, circle), the centroid (triangle).
            px = ((x0 + x1) // 2, (y0 + 2 * y1) // 3 if o.shape == "triangle" else (y0 + y1) // 2)
            assert image.getpixel(px) == COLORS[o.color], (o, image.getpixel(px))
        greys = [c for _, c in image.getcolors(SIZE * SIZE) if len(set(c)) == 1
                 and 100 <= c[0] <= 180]
        clutter_seen |= bool(greys)
    assert counts == set(range(1, MAX_OBJECTS + 1))
    assert clutter_seen


def test_every_kind_is_asked_only_where_it_has_one_answer():
    rng = random.Random(9)
    for _ in range(300):
        _, objects = make_item(rng)
        asked = questions(rng, objects)
        assert "count" in asked and "exists" in asked
        shapes = [o.shape for o in objects]
        colors = [o.color for o in objects]
        assert ("color" in asked) == any(shapes.count(s) == 1 for s in shapes)
        assert ("shape" in asked) == any(colors.count(c) == 1 for c in colors)


def test_the_training_drill_asks_each_object_and_answers_right():
    """`shapes_data.every_question`, stage 2's dense questions: the benchmark's templates, one
    right answer each, every object's colour and shape where they single it out, and as many
    absent pairs as present ones asked."""
    from benchmarks.shapes_data import every_question

    rng = random.Random(3)
    for _ in range(200):
        _, objects = make_item(rng)
        drill = every_question(rng, objects)
        records = [o.as_dict() for o in objects]
        for kind, (question, answer) in drill:
            match = TEMPLATES[kind].fullmatch(question)
            assert match, question
            assert answer == _answer(kind, match, records), (question, answer, records)
        kinds = [kind for kind, _ in drill]
        shapes = [o.shape for o in objects]
        colors = [o.color for o in objects]
        assert kinds.count("color") == sum(shapes.count(s) == 1 for s in shapes)
        assert kinds.count("shape") == sum(colors.count(c) == 1 for c in colors)
        assert kinds.count("count") == 1
        yes = [a for k, (_, a) in drill if k == "exists" and a == "yes"]
        assert len(yes) == min(3, len(objects)) == kinds.count("exists") - len(yes)
        assert kinds.count("relation") <= 3
