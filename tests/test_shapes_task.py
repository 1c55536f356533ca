"""The shapes VQA task (testbed/task.py) is the one issue 15 fixes.

Every question matches one of the five templates, has one right answer (recomputed here from the
image's objects), every answer is one lowercase word, objects obey the task's rules, the shapes
are really drawn where the records say, and a seed fixes everything.
"""

from __future__ import annotations

import json
import random
import re

from PIL import Image

from testbed.task import (
    COLORS,
    KINDS,
    MAX_OBJECTS,
    MIN_SIDE,
    PATCH,
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
    from testbed.data import every_question

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


def test_the_centre_drill_names_one_object_against_the_centre_line():
    """`shapes_data.centre_drills`: training only, the relation template with the image's centre
    line in the first slot; the answer is where that line lies against the named object."""
    from testbed.data import CENTRE_QUESTION, centre_drills

    template = re.compile(CENTRE_QUESTION.replace("?", "\\?").format(color=COLOR, shape=SHAPE))
    rng = random.Random(4)
    asked = {"left": 0, "right": 0}
    for _ in range(200):
        _, objects = make_item(rng)
        drills = centre_drills(rng, objects, most=4)
        clear = [o for o in objects if abs(o.centre_x - SIZE / 2) >= RELATION_MARGIN / 2]
        assert len(drills) == min(4, len(clear))
        named = set()
        for kind, (question, answer) in drills:
            match = template.fullmatch(question)
            assert kind == "centre" and match, question
            (o,) = [o for o in clear if (o.color, o.shape) == (match[1], match[2])]
            named.add(o)
            # "Is the image centre left or right of the object?": left when the object is right.
            assert answer == ("left" if o.centre_x > SIZE / 2 else "right")
            asked[answer] += 1
        assert len(named) == len(drills)  # each object at most once
    assert min(asked.values()) > 0.4 * sum(asked.values())


def test_centre_patches_and_kept_patches():
    """The tower's centre-patch labels lie on their objects; `keep_indices` keeps k ascending
    distinct patches in every mode, each object's centre patch first in `centres`, object patches
    first in `object_patches`, and the oracle takes an object's centre among equally covered
    patches (so K=16 keeps the centre of every object of the task)."""
    import torch

    from testbed.data import (
        GRID,
        PATCH_OWNER_SHARE,
        centre_patch,
        keep_indices,
        scenes,
        vision_targets,
    )

    _, batch = scenes(random.Random(8), 40)
    targets = vision_targets(batch, position_bins=12)
    gen = torch.Generator().manual_seed(0)
    kept = {mode: keep_indices(mode, k, batch, gen) for mode, k in
            (("centres", 8), ("object_patches", 128), ("oracle", 16), ("random", 16))}
    for b, scene in enumerate(batch):
        centres = {centre_patch(o) for o in scene.objects}
        assert set(torch.nonzero(targets["centre"][b]).flatten().tolist()) == centres
        cov = scene.coverage.reshape(len(scene.objects), -1)
        for o, c in zip(scene.objects, cov, strict=True):
            row, col = divmod(centre_patch(o), GRID)  # the patch holds the box's centre pixel
            x0, y0, x1, y1 = o.box
            assert col * PATCH <= (x0 + x1) / 2 < (col + 1) * PATCH
            assert row * PATCH <= (y0 + y1) / 2 < (row + 1) * PATCH
            assert c[centre_patch(o)] > 0
            on = torch.from_numpy(c >= PATCH_OWNER_SHARE)
            x = targets["centre_x"][b][on & (targets["colour"][b] > 0)]
            assert torch.allclose(x[:1], torch.tensor([2 * o.centre_x / SIZE - 1])) or not len(x)
        for mode, keeps in kept.items():
            keep = keeps[b]
            assert keep.tolist() == sorted(set(keep.tolist())), mode
            assert len(keep) == {"centres": 8, "object_patches": 128}.get(mode, 16)
        assert centres <= set(kept["centres"][b].tolist())
        assert centres <= set(kept["oracle"][b].tolist())
        covered = set(torch.nonzero(torch.from_numpy(cov.max(0) >= PATCH_OWNER_SHARE))
                      .flatten().tolist())
        picked = set(kept["object_patches"][b].tolist())
        assert covered <= picked or len(covered) > 128 and len(picked & covered) == 128


def test_packed_questions_train_on_their_own_tokens_too():
    """`Packed.loss` with a question weight: every question token after the first is a target,
    predicted at the position before it; the answers' own loss is reported per kind."""
    from collections import Counter
    from dataclasses import replace

    import torch

    from testbed import data as shapes_data
    from testbed import reading as shapes_reading
    from testbed.model import PRESETS, build

    model, processor = build(PRESETS["ci"])
    tokenizer = processor.tokenizer
    _, batch = shapes_data.scenes(random.Random(2), 3)
    batch = [replace(s, drill=shapes_data.every_question(random.Random(1), s.objects))
             for s in batch]
    feats = torch.randn(len(batch), 8, PRESETS["ci"].vision_hidden)
    packed = shapes_reading.Packed(model, tokenizer, feats, batch, with_answers=True)
    questions = [q for s in batch for q in s.drill]
    tails = [shapes_data.user_prompt(tokenizer, q)[1] for _, (q, _) in questions]
    assert Counter(t for _, _, t in packed.text_targets) == Counter(
        token for tail in tails for token in tail[1:])
    assert len(packed.targets) == 2 * len(questions)  # one-token answers, then </s>
    assert not {(r, p) for r, p, _ in packed.text_targets} & {t[:2] for t in packed.targets}
    loss, by_kind = packed.loss(model, question_weight=0.5)
    answers_only, same_kinds = packed.loss(model, question_weight=0.0)
    assert loss.item() > answers_only.item() > 0
    assert set(by_kind) == set(same_kinds) == {kind for kind, _ in questions}


def test_projector_label_head_learns_patch_labels_that_generalise():
    """`shapes_model.projector_label_loss`: a linear head on the projector's output, trained with
    the projector on a few images' patch colours, shapes and centre marks, reads the colour of
    object patches of other images, and marks their centre patches (the labels are
    `vision_targets`' own: a wrong alignment would not carry over). Untrained CI-size tower: its
    patch features still carry the pixels' colour and their place in an object."""
    import torch

    from testbed import data as shapes_data
    from testbed.model import PRESETS, build, projector_label_loss, projector_probe
    from testbed.reading import feature_layer

    spec = PRESETS["ci"]
    torch.manual_seed(0)
    model, _ = build(spec)
    probe = projector_probe(spec)
    params = [*model.model.multi_modal_projector.parameters(), *probe.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    (train_px, train), (test_px, test) = (shapes_data.scenes(random.Random(s), 12) for s in (5, 6))
    with torch.no_grad():
        train_f, test_f = (feature_layer(model, px)[:, 1:] for px in (train_px, test_px))
    first = None
    for _ in range(150):
        loss = projector_label_loss(model, probe, spec, train_f, train)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    with torch.no_grad():
        read = probe(model.model.multi_modal_projector(test_f))
    targets = shapes_data.vision_targets(test, spec.position_bins)
    colour, on = targets["colour"], targets["colour"] > 0
    assert (read[..., :len(shapes_data.COLOR_NAMES) + 1].argmax(-1)[on]
            == colour[on]).float().mean() > 0.6  # chance: 1/8
    # The centre-patch mark (the last logit): centre patches above the other object patches,
    # those above the background (measured: -2.5, -3.5, -9.8).
    mark, centre = read[..., -1], targets["centre"] > 0
    assert mark[centre].mean() > mark[on & ~centre].mean() + 0.3
    assert mark[on & ~centre].mean() > mark[~on].mean() + 2
