"""Importance helpers: CLS attention against direct references, normalisation, text, unified."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from idselect.importance import (
    cls_attention,
    normalize_scores,
    text_relevance,
    unified,
    unit_rows,
)


def qk(batch=2, tokens=7, heads=4, head_dim=8, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, tokens, heads * head_dim, generator=gen)
    k = torch.randn(batch, tokens, heads * head_dim, generator=gen)
    return q.to(dtype), k.to(dtype)


def reference_loop(q, k, heads, scale):
    """Per-head attention of the CLS query, written out: (B, heads, N)."""
    batch, tokens, width = k.shape
    hd = width // heads
    out = torch.empty(batch, heads, tokens - 1, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            qh = q[b, 0, h * hd : (h + 1) * hd].double()
            kh = k[b, :, h * hd : (h + 1) * hd].double()
            out[b, h] = torch.softmax(kh @ qh * scale, dim=0)[1:]
    return out


def reference_sdpa(q, k, heads, scale):
    """The attention weights out of scaled_dot_product_attention itself: with the identity as
    values, each output row is that query's attention distribution. (B, heads, N)."""
    batch, tokens, width = k.shape
    split = lambda t: t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2)  # noqa: E731
    eye = torch.eye(tokens).expand(batch, heads, tokens, tokens)
    weights = F.scaled_dot_product_attention(split(q.float()), split(k.float()), eye, scale=scale)
    return weights[:, :, 0, 1:]


@pytest.mark.parametrize("heads", [1, 4])
def test_cls_attention_matches_sdpa_and_loop(heads):
    q, k = qk(heads=heads, head_dim=32 // heads)
    scale = 0.125
    loop = reference_loop(q, k, heads, scale)
    sdpa = reference_sdpa(q, k, heads, scale)
    torch.testing.assert_close(sdpa.double(), loop, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cls_attention(q, k, heads, scale).double(), loop.mean(1))
    torch.testing.assert_close(
        cls_attention(q, k, heads, scale, reduce="sum").double(), loop.sum(1), atol=1e-6, rtol=0
    )


def test_cls_attention_uses_only_the_cls_query():
    q, k = qk()
    full = cls_attention(q, k, 4, 0.3)
    assert torch.equal(cls_attention(q[:, :1], k, 4, 0.3), full)
    q2 = q.clone()
    q2[:, 1:] = 1e4  # other queries are irrelevant
    assert torch.equal(cls_attention(q2, k, 4, 0.3), full)


def test_cls_attention_shapes_and_mass():
    q, k = qk(batch=3, tokens=10)
    out = cls_attention(q, k, 4, 0.2)
    assert out.shape == (3, 9) and out.dtype == torch.float32
    # The dropped CLS column takes the rest of each head's unit mass.
    assert bool((out > 0).all()) and bool((out.sum(-1) < 1).all())


def test_cls_attention_head_shards_sum_to_the_whole():
    # Tensor parallelism: each rank holds some heads; summing their partial sums gives the total.
    q, k = qk(heads=4, head_dim=8)
    whole = cls_attention(q, k, 4, 0.125, reduce="sum")
    shards = [
        cls_attention(q[..., i : i + 16], k[..., i : i + 16], 2, 0.125, reduce="sum")
        for i in (0, 16)
    ]
    torch.testing.assert_close(shards[0] + shards[1], whole)
    torch.testing.assert_close(whole / 4, cls_attention(q, k, 4, 0.125))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cls_attention_upcasts_half_precision(dtype):
    q, k = qk(dtype=dtype)
    out = cls_attention(q, k, 4, 0.125)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, cls_attention(q.float(), k.float(), 4, 0.125))


def test_cls_attention_hand_example():
    # One head, head_dim 1, scale 1: logits = q_cls * k = [0, ln 2, ln 3] over (CLS, p1, p2)
    # -> softmax [1, 2, 3] / 6; CLS dropped -> [1/3, 1/2].
    q = torch.tensor([[[1.0], [0.0], [0.0]]])
    k = torch.tensor([[[0.0], [math.log(2.0)], [math.log(3.0)]]])
    torch.testing.assert_close(cls_attention(q, k, 1, 1.0), torch.tensor([[1 / 3, 1 / 2]]))


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((torch.randn(4, 8), torch.randn(1, 4, 8), 2, 1.0), {}, "q must be a 3-D tensor"),
        ((torch.randn(1, 4, 8), torch.randn(4, 8), 2, 1.0), {}, "k must be a 3-D tensor"),
        ((torch.randn(1, 1, 8), torch.randn(2, 4, 8), 2, 1.0), {}, "must agree"),
        ((torch.randn(1, 1, 8), torch.randn(1, 4, 6), 2, 1.0), {}, "must agree"),
        ((torch.randn(1, 4, 8), torch.randn(1, 4, 8), 3, 1.0), {}, "does not divide"),
        ((torch.randn(1, 4, 8), torch.randn(1, 4, 8), 0, 1.0), {}, "num_heads must be"),
        ((torch.randn(1, 4, 8), torch.randn(1, 4, 8), True, 1.0), {}, "num_heads must be"),
        ((torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2, math.nan), {}, "scale must be"),
        ((torch.randn(1, 4, 8), torch.randn(1, 4, 8), 2, 1.0), {"reduce": "max"}, "reduce must"),
    ],
)
def test_cls_attention_errors(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls_attention(*args, **kwargs)


# --- normalize_scores -------------------------------------------------------------------------


def test_normalize_scores_values():
    torch.testing.assert_close(
        normalize_scores(torch.tensor([2.0, 4.0, 6.0])), torch.tensor([0.0, 0.5, 1.0])
    )
    torch.testing.assert_close(
        normalize_scores(torch.tensor([-1.0, 1.0])), torch.tensor([0.0, 1.0])
    )


def test_normalize_scores_edge_cases():
    assert normalize_scores(torch.tensor([3.0, 3.0, 3.0])).tolist() == [1.0, 1.0, 1.0]
    assert normalize_scores(torch.tensor([0.0])).tolist() == [1.0]
    assert normalize_scores(torch.empty(0)).shape == (0,)
    assert normalize_scores(torch.tensor([1, 3])).tolist() == [0.0, 1.0]  # integers upcast
    assert normalize_scores(torch.tensor([1.0, 3.0], dtype=torch.float16)).dtype == torch.float32
    assert normalize_scores(torch.tensor([1.0, 3.0], dtype=torch.float64)).dtype == torch.float64
    # Extreme but finite spans stay finite and exact at the ends.
    assert normalize_scores(torch.tensor([0.0, 1e-40, 3e38])).tolist()[::2] == [0.0, 1.0]


def test_normalize_scores_is_per_row():
    rows = normalize_scores(torch.tensor([[0.0, 5.0, 10.0], [7.0, 7.0, 7.0], [4.0, 2.0, 0.0]]))
    torch.testing.assert_close(
        rows, torch.tensor([[0.0, 0.5, 1.0], [1.0, 1.0, 1.0], [1.0, 0.5, 0.0]])
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=1, max_size=30))
def test_normalize_scores_range_and_order(values):
    s = torch.tensor(values)
    out = normalize_scores(s)
    assert bool(((out >= 0) & (out <= 1)).all())
    if float(s.max()) > float(s.min()):
        assert float(out[s.argmax()]) == 1.0 and float(out[s.argmin()]) == 0.0
    # Monotone: a larger score never normalises to a smaller value.
    order = torch.argsort(s, stable=True)
    assert bool((out[order].diff() >= 0).all())


def test_normalize_scores_rejects_non_tensors():
    with pytest.raises(ValueError, match="scores must be a torch.Tensor"):
        normalize_scores([1.0, 2.0])


# --- unit_rows --------------------------------------------------------------------------------


def test_unit_rows_norms_and_zero_rows():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [2.0**100, 0.0], [2.0**-100, 2.0**-100]])
    out = unit_rows(x)
    torch.testing.assert_close(out[0], torch.tensor([0.6, 0.8]))
    assert out[1].tolist() == [0.0, 0.0]
    assert out[2].tolist() == [1.0, 0.0]
    torch.testing.assert_close(out[3], torch.full((2,), 2**-0.5))
    assert x[0].tolist() == [3.0, 4.0]  # the input is left alone


def test_unit_rows_inplace_reuses_an_owned_fp32_tensor():
    x = torch.tensor([[3.0, 4.0]])
    assert unit_rows(x, inplace=True) is x
    torch.testing.assert_close(x, torch.tensor([[0.6, 0.8]]))


# --- text_relevance ---------------------------------------------------------------------------


def test_text_relevance_hand_example():
    visual = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[5.0, 0.0], [0.0, 1.0]])
    # cosines: rows [1, 0], [0, 1], [-1, 0], [.7071, .7071]
    torch.testing.assert_close(text_relevance(visual, text), torch.tensor([1.0, 1.0, 0.0, 2**-0.5]))
    # mean: [.5, .5, -.5 -> 0 (clamped), .7071]
    torch.testing.assert_close(
        text_relevance(visual, text, reduce="mean"), torch.tensor([0.5, 0.5, 0.0, 2**-0.5])
    )


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 5), st.integers(1, 6), st.integers(0, 2**31))
def test_text_relevance_is_non_negative_and_bounded(n, t, d, seed):
    gen = torch.Generator().manual_seed(seed)
    visual, text = torch.randn(n, d, generator=gen), torch.randn(t, d, generator=gen)
    for reduce in ("max", "mean"):
        out = text_relevance(visual, text, reduce=reduce)
        assert out.shape == (n,) and out.dtype == torch.float32
        assert bool(((out >= 0) & (out <= 1 + 1e-6)).all())


@pytest.mark.parametrize(
    ("visual", "text", "kwargs", "match"),
    [
        (torch.randn(3), torch.randn(2, 3), {}, "visual must be a 2-D tensor"),
        (torch.randn(3, 4), torch.randn(2, 3), {}, "need the same D"),
        (torch.randn(3, 4), torch.randn(0, 4), {}, "at least one token"),
        (torch.randn(3, 4), torch.randn(2, 4), {"reduce": "sum"}, "reduce must"),
    ],
)
def test_text_relevance_errors(visual, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        text_relevance(visual, text, **kwargs)


# --- unified ----------------------------------------------------------------------------------


def test_unified_is_a_weighted_mean_of_normalised_scores():
    a = torch.tensor([0.0, 10.0, 20.0])  # -> [0, .5, 1]
    b = torch.tensor([4.0, 2.0, 0.0])  # -> [1, .5, 0]
    torch.testing.assert_close(unified(a, b), torch.tensor([0.5, 0.5, 0.5]))
    torch.testing.assert_close(unified(a, b, weights=[3, 1]), torch.tensor([0.25, 0.5, 0.75]))
    torch.testing.assert_close(unified(a), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(unified(a, b, weights=[1.0, 0.0]), torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize(
    ("tensors", "kwargs", "match"),
    [
        ((), {}, "at least one"),
        ((torch.rand(3), torch.rand(4)), {}, "shape"),
        ((torch.rand(3), [1.0, 2.0, 3.0]), {}, "shape"),
        ((torch.rand(3),), {"weights": [1.0, 1.0]}, "weights has 2 entries"),
        ((torch.rand(3), torch.rand(3)), {"weights": [1.0, -1.0]}, "finite and >= 0"),
        ((torch.rand(3), torch.rand(3)), {"weights": [0.0, 0.0]}, "not all be zero"),
    ],
)
def test_unified_errors(tensors, kwargs, match):
    with pytest.raises(ValueError, match=match):
        unified(*tensors, **kwargs)
