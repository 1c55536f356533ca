"""Capture the queries and keys of a vision-tower attention op during its normal pass.

The importance scores ID-Selection needs come for free from the tower's own attention: a forward
pre-hook sees the op's q and k (the [CLS] query of a CLIP feature layer, or every query of a
full-attention block of a ViT without [CLS]). Recomputing them from weights is not an option on
the CPU backend, where linear weights are repacked and `.weight` is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture_qk(attn_op: nn.Module) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Record (query, key) each time `attn_op(query, key, value, ...)` runs inside the block."""
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        captured.append((query, key))

    handle = attn_op.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def single_call(captured: list, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The one (query, key) a pass recorded; a layer that ran twice or never is a bug."""
    if len(captured) != 1:
        raise RuntimeError(f"expected {what} to run once, it ran {len(captured)} times")
    return captured[0]


def encode_with_cls_scores(
    tower: Callable[[torch.Tensor], torch.Tensor], clip_attention: nn.Module, pixels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the tower once; return its features and the feature layer's [CLS]->patch attention.

    Scores are summed over heads. With tensor parallelism the heads are sharded across ranks, so
    the partial sums are all-reduced before anyone selects, or ranks would disagree.
    """
    from vllm.distributed import (
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    from idselect.importance import cls_attention

    attn = clip_attention.attn
    with capture_qk(attn) as captured:
        features = tower(pixels)
    query, keys = single_call(captured, "the feature-layer attention")
    cls_query = query[:, :1]
    scores = cls_attention(cls_query, keys, attn.num_heads, attn.scale, reduce="sum")
    if get_tensor_model_parallel_world_size() > 1 and clip_attention.tp_size > 1:
        scores = tensor_model_parallel_all_reduce(scores)
    return features, scores
