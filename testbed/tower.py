"""Stage 1 of the shapes test bed (`testbed.model`): the vision tower trained from
dense labels at its feature layer, and what its heads read from held-out images; also the
learning-rate schedule both stages share."""

from __future__ import annotations

import math
import random
import sys
from typing import TYPE_CHECKING

from testbed.data import COLOR_NAMES, PAIRS, Scene, scenes, vision_targets
from testbed.reading import feature_layer
from testbed.task import MAX_OBJECTS, SHAPES, SIZE

if TYPE_CHECKING:
    from testbed.spec import ShapesSpec


def schedule(step: int, steps: int, lr: float, warmup: int = 50) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train_vision(model, spec: ShapesSpec, rng: random.Random, held_out, log) -> None:
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    d = spec.vision_hidden
    heads = torch.nn.ModuleDict({
        "present": torch.nn.Linear(d, len(PAIRS)), "count": torch.nn.Linear(d, MAX_OBJECTS),
        "colour": torch.nn.Linear(d, len(COLOR_NAMES) + 1),
        "shape": torch.nn.Linear(d, len(SHAPES) + 1),
        "column": torch.nn.Linear(d, spec.position_bins + 1),
        "centre_x": torch.nn.Linear(d, 1), "centre": torch.nn.Linear(d, 1),
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
        targets = {k: v.to(model.device) for k, v in
                   vision_targets(batch, spec.position_bins).items()}
        x = feature_layer(model, pixels.to(model.device))
        cls, patches = x[:, 0], x[:, 1:]
        on = targets["colour"] > 0
        patch_loss = 0.0
        for name in ("colour", "shape", "column"):
            target = targets[name]
            ce = F.cross_entropy(heads[name](patches).flatten(0, 1), target.flatten(),
                                 reduction="none").view_as(target)
            patch_loss = patch_loss + ce[on].mean() + 0.5 * ce[~on].mean()
        cx = heads["centre_x"](patches).squeeze(-1)
        centre = targets["centre"] > 0
        bce = F.binary_cross_entropy_with_logits(heads["centre"](patches).squeeze(-1),
                                                 targets["centre"], reduction="none")
        patch_loss = patch_loss + spec.centre_weight * (
            4 * F.mse_loss(cx[on], targets["centre_x"][on]) + bce[centre].mean()
            + bce[~centre].mean())
        loss = (F.binary_cross_entropy_with_logits(heads["present"](cls), targets["present"])
                + F.cross_entropy(heads["count"](cls), targets["count"]) + patch_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        log.setdefault("vision_loss", []).append(round(loss.item(), 4))
        if (step + 1) % spec.eval_every == 0 or step + 1 == spec.vision_steps:
            tower.eval()
            acc = head_accuracy(model, heads, spec, *held_out)
            tower.train()
            log.setdefault("vision_held_out", []).append({"step": step + 1, **acc})
            bar.write(f"step {step + 1}: held-out accuracy of the tower's heads "
                      + " ".join(f"{k}={v:.2f}" for k, v in acc.items()), file=sys.stderr)
    tower.eval()


def head_accuracy(model, heads, spec: ShapesSpec, pixels, batch: list[Scene]) -> dict:
    """What the tower's feature layer carries, read by its training heads on held-out images:
    the colour, shape and centre-x bin of the object under each object patch, the mean error of
    its centre x (pixels), the centre patches (found, and false ones per image), the count and
    the present (shape, colour) pairs (all of an image's pairs right)."""
    import torch

    targets = {k: v.to(model.device) for k, v in vision_targets(batch, spec.position_bins).items()}
    with torch.inference_mode():
        x = torch.cat([feature_layer(model, pixels[at:at + 25].to(model.device))
                       for at in range(0, len(batch), 25)])
        cls, patches = x[:, 0], x[:, 1:]
        on = targets["colour"] > 0
        out = {f"patch_{name}": float((heads[name](patches[on]).argmax(-1)
                                       == targets[name][on]).float().mean())
               for name in ("colour", "shape", "column")}
        x = heads["centre_x"](patches[on]).squeeze(-1)
        out["centre_x_px"] = float((x - targets["centre_x"][on]).abs().mean()) * SIZE / 2
        found = heads["centre"](patches).squeeze(-1) > 0
        centre = targets["centre"] > 0
        out["centre_found"] = float(found[centre].float().mean())
        out["centre_false_per_image"] = float((found & ~centre).sum()) / len(batch)
        out["count"] = float((heads["count"](cls).argmax(-1) == targets["count"]).float().mean())
        pairs = (heads["present"](cls) > 0) == (targets["present"] > 0.5)
        out["pairs"] = float(pairs.all(-1).float().mean())
    return {k: round(v, 3) for k, v in out.items()}
