"""Reading the shapes test bed's model the way LLaVA-1.5 does, in plain torch: the tower's
penultimate-layer features, every question of an image packed into one sequence, greedy first
answers and held-out accuracy for a choice of kept patches.

Packing is what makes training and evaluation affordable on CPU: the image's tokens are computed
once and each question attends to them and to itself only, with the positions it would have
alone, so its logits equal transformers' own LLaVA forward on that prompt (the CI test bed checks
the served answers against `first_answers`).
"""

from __future__ import annotations

import math

from testbed.data import (
    PATCHES,
    Scene,
    answer_ids,
    keep_indices,
    user_prompt,
)
from testbed.task import KINDS


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
            asked = list(scene.asked.items()) if scene.drill is None else list(scene.drill)
            for kind, (question, answer) in asked:
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
        # Training only: the question's own tokens, each predicted from the ones before it.
        self.text_targets: list[tuple[int, int, int]] = []  # (row, pos, token)
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
                    self.text_targets += [(row, at + j - 1, tokens[j]) for j in range(1, start)]
                else:
                    self.targets.append((row, at + start - 1, -1, kind, answer))
                at += n
        query, key = segment[:, :, None], segment[:, None, :]
        causal = torch.ones(total, total, dtype=torch.bool).tril()
        allowed = causal & ((key == -1) | (key == query))
        allowed |= torch.eye(total, dtype=torch.bool)  # padding rows attend to themselves
        device = features.device
        embeds = embed(ids.to(device))
        image = model.model.multi_modal_projector(features)
        embeds = torch.cat([embeds[:, :p], image, embeds[:, p + k:]], dim=1)
        # An additive mask: SDPA on CPU turns a boolean one into this in every layer.
        mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=device).masked_fill_(
            ~allowed.to(device), -math.inf)
        self.embeds, self.mask, self.positions = embeds, mask[:, None], positions.to(device)

    def logits(self, model, targets=None):
        """The LM head's logits at each target's position (`targets`: default, the answers')."""
        import torch

        hidden = model.model.language_model(inputs_embeds=self.embeds, attention_mask=self.mask,
                                            position_ids=self.positions).last_hidden_state
        targets = self.targets if targets is None else targets
        rows = torch.tensor([t[0] for t in targets], device=self.embeds.device)
        cols = torch.tensor([t[1] for t in targets], device=self.embeds.device)
        return model.lm_head(hidden[rows, cols])

    def loss(self, model, question_weight: float = 0.0):
        """Training loss: cross-entropy on the answer tokens (and `</s>`), plus
        `question_weight` x cross-entropy on the question's own tokens. Also returns the answer
        tokens' mean loss per kind."""
        import torch
        import torch.nn.functional as F

        both = self.targets + (self.text_targets if question_weight else [])
        labels = torch.tensor([t[2] for t in both], device=self.embeds.device)
        ce = F.cross_entropy(self.logits(model, both), labels, reduction="none")
        answers = ce[: len(self.targets)]
        loss = answers.mean()
        if question_weight and self.text_targets:
            loss = loss + question_weight * ce[len(self.targets):].mean()
        per_kind: dict[str, list[float]] = {}
        previous = None
        for i, (row, pos, _, kind, _) in enumerate(self.targets):
            if previous != (row, pos - 1):  # an answer's first token (then the rest, `</s>`)
                per_kind.setdefault(kind, []).append(i)
            previous = (row, pos)
        kinds = {k: float(answers[v].detach().mean()) for k, v in per_kind.items()}
        return loss, kinds


def gather(features, keep: list):
    import torch

    return torch.stack([f[i.to(f.device)] for f, i in zip(features, keep, strict=True)])


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
            feats = feature_layer(model, pixels[at:at + chunk].to(model.device))[:, 1:]
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
