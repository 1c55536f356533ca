"""Why the selectors rank as they do on the shapes test bed: an offline sweep in transformers.

    python -m testbed.sweep --data out/shapes-eval/data.jsonl \
        --model models/shapes-llava [--budgets 8,16,32] [--gammas 2,5,20,80] [--out DIR]

The tower runs once per question (eager attention, so the feature layer's [CLS]->patch attention
is the score the plugin uses); then each selection is answered by the same weights, greedy first
answer token: `id_select` at several gamma (the similarity scale of its suppression kernel; the
server uses 20), `topk` (gamma -> infinity), `divprune`, `pool`, `random` and the oracle (the
patches covering the recorded objects). Besides exact match on all, count and multi-object
questions it reports what each selection kept: the share of objects with at least one kept patch
(one the object covers >= 25% of) and the share of kept patches that lie on an object. And
whether the tower's patch features carry what the questions need: a linear probe (ridge least
squares, fitted on the first half of the questions' images, scored on the second) of the colour,
shape and centre-x bin of the object under each object patch; if those are high while the model
answers at chance, the LM is the bottleneck, not the tower. Writes sweep.json and sweep.md to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from benchmarks.accuracy import load_items
from testbed.report import MULTI_OBJECT


def main(argv: list[str] | None = None) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from idselect.baselines import get_selector
    from testbed.data import (
        PATCH_OWNER_SHARE,
        PATCHES,
        Scene,
        answer_ids,
        keep_indices,
        pixels_of,
        vision_targets,
    )
    from testbed.model import ShapesSpec
    from testbed.reading import first_answers
    from testbed.task import Shape, patch_coverage

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--budgets", default="8,16,32")
    parser.add_argument("--gammas", default="2,5,20,80")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--out", default="out/shapes-sweep")
    args = parser.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    gammas = [float(g) for g in args.gammas.split(",")]
    items = load_items(Path(args.data), args.limit)
    base = Path(args.data).parent

    model = LlavaForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager").eval()
    tokenizer = AutoProcessor.from_pretrained(args.model).tokenizer
    configs = {f"id_select g={g:g}": get_selector("id_select", gamma=g) for g in gammas}
    configs |= {name: get_selector(name) for name in ("topk", "divprune", "pool")}

    kinds = np.array([item["kind"] for item in items])
    counts = np.array([len(item["objects"]) for item in items])
    training = Path(args.model) / "idselect_training.json"
    spec = json.loads(training.read_text())["spec"] if training.exists() else {}
    bins = spec.get("position_bins", ShapesSpec.position_bins)
    probe_x: list = []
    probe_y: dict[str, list] = {"colour": [], "shape": [], "column": []}
    probe_half: list = []
    right: dict[str, list[bool]] = {}
    covered: dict[str, list[float]] = {}
    on_object: dict[str, list[float]] = {}
    for at in range(0, len(items), 50):
        part = items[at:at + 50]
        scenes, cover = [], []
        for item in part:
            objects = [Shape(o["shape"], o["color"], tuple(o["box"])) for o in item["objects"]]
            coverage = patch_coverage(objects)
            scenes.append(Scene(objects, coverage,
                                {item["kind"]: (item["question"], item["answers"][0])}))
            cover.append(torch.from_numpy(coverage.reshape(len(objects), PATCHES)
                                          >= PATCH_OWNER_SHARE))
        pixels = pixels_of([Image.open(base / i["image"]).convert("RGB") for i in part])
        with torch.inference_mode():
            out = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True,
                                           output_attentions=True)
        layer = model.config.vision_feature_layer
        features = out.hidden_states[layer][:, 1:]
        scores = out.attentions[layer][:, :, 0, 1:].sum(1)
        truth = [answer_ids(tokenizer, i["answers"][0])[0] for i in part]
        labels = vision_targets(scenes, bins)
        on = labels["colour"] > 0
        probe_x.append(features[on])
        for name in probe_y:
            probe_y[name].append(labels[name][on])
        image = at + on.nonzero()[:, 0]  # the question's index, per object patch
        probe_half.append(image < len(items) // 2)
        for k in budgets:
            picks: dict[str, list] = {
                name: [selector(f, s, k).sort().values for f, s in zip(features, scores,
                                                                      strict=True)]
                for name, selector in configs.items()}
            gen = torch.Generator().manual_seed(at)
            picks["random"] = keep_indices("random", k, scenes, gen)
            picks["oracle"] = keep_indices("oracle", k, scenes, gen)
            for name, keep in picks.items():
                key = f"{name} @{k}"
                best = first_answers(model, tokenizer, pixels, scenes, keep=keep)
                right.setdefault(key, []).extend(b == t for b, t in zip(best, truth, strict=True))
                for kept, c in zip(keep, cover, strict=True):
                    covered.setdefault(key, []).append(float(c[:, kept].any(1).float().mean()))
                    on_object.setdefault(key, []).append(float(c[:, kept].any(0).float().mean()))
        print(f"sweep: {at + len(part)}/{len(items)}", file=sys.stderr, flush=True)

    groups = {"all": np.ones(len(items), bool), "count": kinds == "count",
              "multi-object": counts >= MULTI_OBJECT}
    rows = []
    for key in right:
        hit = np.array(right[key])
        rows.append({"selection": key, **{g: 100 * hit[m].mean() for g, m in groups.items()},
                     "objects_with_a_kept_patch": 100 * np.mean(covered[key]),
                     "kept_on_objects": 100 * np.mean(on_object[key])})
    rows.sort(key=lambda r: (int(r["selection"].rsplit("@", 1)[1]), -r["all"]))
    probes = linear_probe(torch.cat(probe_x), {n: torch.cat(v) for n, v in probe_y.items()},
                          torch.cat(probe_half))
    lines = [f"{len(items)} questions; exact match % (greedy first token, transformers)", "",
             "| selection | all | count | multi-object | objects with a kept patch | "
             "kept patches on objects |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['selection']} | {r['all']:.1f} | {r['count']:.1f} | "
              f"{r['multi-object']:.1f} | {r['objects_with_a_kept_patch']:.1f} | "
              f"{r['kept_on_objects']:.1f} |" for r in rows]
    lines += ["", "Linear probe of the feature layer's object patches (held-out images), "
              "accuracy %: " + ", ".join(f"{name} {100 * acc:.1f} (majority {100 * chance:.1f})"
                          for name, (acc, chance) in probes.items())]
    text = "\n".join(lines) + "\n"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"questions": len(items), "budgets": budgets, "gammas": gammas, "rows": rows,
              "linear_probe": {n: {"accuracy": a, "majority": c} for n, (a, c) in probes.items()}}
    (out_dir / "sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    (out_dir / "sweep.md").write_text(text)
    print(text)
    return result


def linear_probe(x, labels: dict, train, ridge: float = 1e-2) -> dict[str, tuple[float, float]]:
    """name -> (held-out accuracy, majority-class share) of a ridge least-squares one-hot
    classifier on features `x` (rows where `train` is true fit it; the others score it)."""
    import torch

    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    a, b = x[train], x[~train]
    gram = a.T @ a + ridge * len(a) * torch.eye(x.shape[1], dtype=torch.float64)
    out = {}
    for name, y in labels.items():
        onehot = torch.nn.functional.one_hot(y, int(y.max()) + 1).double()
        w = torch.linalg.solve(gram, a.T @ onehot[train])
        acc = float(((b @ w).argmax(1) == y[~train]).double().mean())
        out[name] = (acc, float(y[~train].bincount().max() / len(b)))
    return out


if __name__ == "__main__":
    main()
