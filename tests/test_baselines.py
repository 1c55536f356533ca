"""Baseline selectors: shared contract, hand examples, reproducibility and the registry."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idselect.baselines import (
    SELECTORS,
    divprune,
    get_selector,
    random_select,
    topk_importance,
    uniform_pool,
)
from idselect.selection import id_select

NAMES = ["id_select", "topk", "divprune", "random", "pool"]


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 50), st.integers(1, 5), st.integers(0, 2**31))
def test_every_selector_keeps_the_contract(name, n, k, d, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=gen).float()  # duplicates and ties included
    s = torch.randint(0, 4, (n,), generator=gen).float()
    out = SELECTORS[name](x, s, k)
    picks = out.tolist()
    assert out.dtype == torch.int64
    assert len(picks) == min(k, n)
    assert picks == sorted(set(picks)) and all(0 <= i < n for i in picks)
    if k >= n:
        assert picks == list(range(n))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("features", "scores", "k", "match"),
    [
        (torch.randn(4, 2), torch.rand(4), 0, "k must be an int >= 1"),
        (torch.randn(4, 2), torch.rand(4), True, "k must be an int"),
        (torch.randn(4), torch.rand(4), 2, "features must be 2-D"),
        (torch.randn(4, 2), torch.rand(3), 2, "features has 4 tokens but scores has 3"),
        (torch.full((4, 2), math.nan), torch.rand(4), 2, "features must be finite"),
        (torch.randn(4, 2), -torch.ones(4), 2, "scores must be non-negative"),
    ],
)
def test_every_selector_shares_validation(name, features, scores, k, match):
    with pytest.raises(ValueError, match=match):
        SELECTORS[name](features, scores, k)


def test_topk_ties_go_to_lower_index():
    x = torch.zeros(5, 2)
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0])
    assert topk_importance(x, s, 2).tolist() == [1, 2]
    assert topk_importance(x, s, 3).tolist() == [1, 2, 4]
    assert topk_importance(x, s, 4).tolist() == [1, 2, 3, 4]


# t0 = (1, 0); t1 = (10, 1) and t4 = (10, -1) sit next to t0 (cos .995, distance .005);
# t2 = (0, 1); t3 = (-1, 0).
SPREAD_X = torch.tensor([[1.0, 0.0], [10.0, 1.0], [0.0, 1.0], [-1.0, 0.0], [10.0, -1.0]])
SPREAD_S = torch.tensor([1.0, 0.9, 0.1, 0.1, 0.8])


def test_divprune_picks_a_spread_set():
    # Nearest-other distances: t0 .005, t1 .005, t4 .005, t2 .9005 (to t1/t4), t3 1.0 (to t2):
    # first pick t3 (most isolated). Distances to {t3}: t0 2, t1 1.995, t2 1, t4 1.995 -> t0.
    # Min distance to {t3, t0}: t1 .005, t4 .005, t2 1 -> t2.
    assert divprune(SPREAD_X, SPREAD_S, 3).tolist() == [0, 2, 3]
    # Then t1 and t4 tie at .005 (mirror images) -> lower index t1.
    assert divprune(SPREAD_X, SPREAD_S, 4).tolist() == [0, 1, 2, 3]
    # Importance alone would keep the redundant cluster around t0.
    assert topk_importance(SPREAD_X, SPREAD_S, 3).tolist() == [0, 1, 4]


def test_divprune_ignores_scores_and_first_pick_is_most_isolated():
    other = torch.tensor([0.0, 0.0, 5.0, 0.0, 9.0])
    assert divprune(SPREAD_X, other, 3).tolist() == divprune(SPREAD_X, SPREAD_S, 3).tolist()
    assert divprune(SPREAD_X, SPREAD_S, 1).tolist() == [3]


def test_divprune_first_pick_is_chunk_independent(monkeypatch):
    import idselect.baselines as baselines

    gen = torch.Generator().manual_seed(3)
    x, s = torch.randn(50, 6, generator=gen), torch.rand(50, generator=gen)
    whole = divprune(x, s, 10).tolist()
    monkeypatch.setattr(baselines, "_CHUNK", 7)
    assert divprune(x, s, 10).tolist() == whole


def test_random_is_seeded_and_reproducible():
    x, s = torch.randn(100, 3), torch.rand(100)
    a = random_select(0)(x, s, 10).tolist()
    assert a == random_select(0)(x, s, 10).tolist()
    assert a == SELECTORS["random"](x, s, 10).tolist()  # the registry's default seed is 0
    assert a != random_select(1)(x, s, 10).tolist()
    # Stateless: earlier calls and the global RNG do not shift later draws.
    torch.manual_seed(123)
    selector = random_select(7)
    first = selector(x, s, 10).tolist()
    torch.rand(10)
    assert selector(x, s, 10).tolist() == first
    with pytest.raises(ValueError, match="seed must be an int"):
        random_select(1.5)


def test_uniform_on_24x24_grid_is_a_lattice():
    x, s = torch.zeros(576, 1), torch.zeros(576)
    # k = 64: 8 rows x 8 columns at cell centres of width 3: 1, 4, 7, ..., 22.
    lattice = [1, 4, 7, 10, 13, 16, 19, 22]
    assert uniform_pool(x, s, 64).tolist() == [r * 24 + c for r in lattice for c in lattice]
    # k = 16: 4 x 4 at cell centres of width 6: 3, 9, 15, 21.
    coarse = [3, 9, 15, 21]
    assert uniform_pool(x, s, 16).tolist() == [r * 24 + c for r in coarse for c in coarse]


def test_uniform_shares_points_evenly_between_rows():
    x, s = torch.zeros(576, 1), torch.zeros(576)
    picks = uniform_pool(x, s, 192).tolist()  # ceil(sqrt(192)) = 14 rows, 13 or 14 points each
    rows: dict[int, int] = {}
    for p in picks:
        rows[p // 24] = rows.get(p // 24, 0) + 1
    assert len(picks) == 192 and len(rows) == 14
    assert sorted(set(rows.values())) == [13, 14]


def test_uniform_non_square_is_evenly_spaced():
    x, s = torch.zeros(10, 1), torch.zeros(10)
    assert uniform_pool(x, s, 3).tolist() == [1, 5, 8]  # centres of runs of 10/3
    assert uniform_pool(x, s, 5).tolist() == [1, 3, 5, 7, 9]


def test_registry_names_and_params():
    assert sorted(SELECTORS) == sorted(NAMES)
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    s = torch.tensor([1.0, 0.5, 0.2, 0.0])
    assert get_selector("id_select")(x, s, 2).tolist() == id_select(x, s, 2).tolist() == [0, 2]
    mult = get_selector("id_select", suppression="multiply", gamma=20)
    assert mult(x, s, 2).tolist() == [0, 1]
    assert get_selector("id_select", gamma=1e9)(x, s, 2).tolist() == [0, 1]
    assert get_selector("random", seed=5)(x, s, 2).tolist() == random_select(5)(x, s, 2).tolist()
    assert get_selector("topk") is topk_importance


def test_registry_errors():
    with pytest.raises(ValueError, match="valid names: divprune, id_select, pool, random, topk"):
        get_selector("fastv")
    with pytest.raises(ValueError, match="invalid parameters for selector 'topk'"):
        get_selector("topk", gamma=3.0)
    with pytest.raises(ValueError, match="accepted: gamma, suppression"):
        get_selector("id_select", gama=3.0)
    with pytest.raises(ValueError, match="gamma must be > 0"):
        get_selector("id_select", gamma=-1.0)
    with pytest.raises(ValueError, match="suppression must be one of"):
        get_selector("id_select", suppression="divide")
    with pytest.raises(TypeError):
        SELECTORS["topk"] = topk_importance  # read-only
