"""The shapes test bed's model sizes and training schedule (`ShapesSpec`) and its presets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapesSpec:
    """Model sizes and the training schedule (the checkpoint directory records it)."""

    vision_hidden: int = 128
    vision_layers: int = 5  # the last one is never run: LLaVA-1.5 reads the penultimate layer
    vision_heads: int = 2
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4
    vocab_size: int = 512
    vision_steps: int = 1500
    vision_batch: int = 16
    vision_lr: float = 1e-3
    lm_steps: int = 3000
    lm_batch: int = 16
    lm_lr: float = 1e-3
    # Stage 2 draws its images from a pool whose frozen-tower features are computed once (the
    # tower's forward pass would cost about as much as the LM's step); each draw asks fresh
    # questions of the image.
    lm_pool: int = 16000
    # What the LM reads, by share of its steps: each object's centre patch (plus random ones, 8
    # tokens in all) until `centres_until`, every object patch first (128 tokens) until
    # `objects_until`, then all 576 tokens in a `full_share` of the steps and sparse subsets
    # (random, or biased to object patches; K log-uniform in [8, 576]) in the rest. Few tokens
    # first: with 576 tokens from the start, the questions that need one object found by name
    # (existence, relation) stayed at chance; on a handful of tokens the LM finds them in a few
    # hundred steps and keeps them as the image fills up (docs/performance.md).
    centres_until: float = 0.25
    objects_until: float = 0.5
    full_share: float = 0.5
    # Every object patch learns its object's horizontal position (`position_bins` bins of the
    # centre x, and the centre x itself) besides its colour and shape; the patch under each
    # object's centre learns that it is one (`centre_weight` weighs both).
    position_bins: int = 12
    centre_weight: float = 1.0
    # Stage 2 asks each image every question it admits (`every_question`: each object's colour
    # and shape, up to three present pairs and as many absent, up to three relations, the
    # count), plus up to `centre_drills` training-only drills (`centre_drills`: where one named
    # object lies against the image's centre line, the step that makes relations learnable).
    centre_drills: int = 4
    # The loss is on the answers, plus `question_loss` x the loss on the questions' own tokens
    # (predicting "square" after "Is there a red" needs the image: it trains the lookup of an
    # object by name where the name is read).
    question_loss: float = 0.5
    # Stage 2 also trains a linear head on the projector's output of every patch to tell the
    # colour and the shape of the object under it (training only; `projector_labels` weighs its
    # loss): without it, the projector squashed colour and the LM answered colour blind.
    projector_labels: float = 1.0
    # ... and (`projector_centres` weighs it) whether the patch is an object's centre patch, the
    # one mark per object that a count can be read from (the tower learns it in stage 1).
    projector_centres: float = 1.0
    eval_images: int = 300
    eval_every: int = 500
    seed: int = 0


PRESETS = {
    "full": ShapesSpec(),
    # The CI test bed: the same pipeline, small enough to train in under 3 minutes (it learns
    # counts well above image-blind answers; the other kinds stay near chance at this size).
    "ci": ShapesSpec(vision_hidden=64, vision_layers=3, vision_heads=1, text_hidden=64,
                     text_layers=3, text_heads=1, vision_steps=300, vision_batch=8,
                     vision_lr=2e-3, lm_steps=1000, lm_batch=8, lm_lr=3e-3, lm_pool=4000,
                     eval_images=150, eval_every=10**9),
}
