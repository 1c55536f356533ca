"""Capture the [CLS] query and the keys of a vision-tower attention op during its normal pass.

The scores ID-Selection needs come for free from the feature layer's own attention: a forward
pre-hook sees the op's q and k. Recomputing them from weights is not an option on the CPU backend,
where linear weights are repacked and `.weight` is empty.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class CapturedQK:
    """q of the [CLS] token (batch, 1, heads*dim) and all keys (batch, 1+N, heads*dim)."""

    cls_query: list[torch.Tensor] = field(default_factory=list)
    keys: list[torch.Tensor] = field(default_factory=list)

    def single(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.keys) != 1:
            raise RuntimeError(
                f"expected the feature-layer attention to run once, it ran {len(self.keys)} times"
            )
        return self.cls_query[0], self.keys[0]


@contextmanager
def capture_cls_qk(attn_op: nn.Module) -> Iterator[CapturedQK]:
    """Record (q[:, :1], k) each time `attn_op(query, key, value, ...)` runs inside the block."""
    captured = CapturedQK()

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        query = args[0] if len(args) > 0 else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs["key"]
        captured.cls_query.append(query[:, :1])
        captured.keys.append(key)

    handle = attn_op.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


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
    with capture_cls_qk(attn) as captured:
        features = tower(pixels)
    cls_query, keys = captured.single()
    scores = cls_attention(cls_query, keys, attn.num_heads, attn.scale, reduce="sum")
    if get_tensor_model_parallel_world_size() > 1 and clip_attention.tp_size > 1:
        scores = tensor_model_parallel_all_reduce(scores)
    return features, scores
