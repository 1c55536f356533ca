"""Baseline token selectors beside ID-Selection, behind one interface, for A/B runs and tests.

Every selector takes (features (N, D), scores (N,), k) and returns min(k, N) unique indices sorted
ascending (int64, on the input's device). All of them validate their inputs with the same
`check_selection_inputs` as `id_select`, so they accept and refuse exactly the same inputs, even
the ones that ignore scores or features.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from functools import partial
from numbers import Integral
from types import MappingProxyType
from typing import Protocol

import torch
from torch import Tensor

from idselect.importance import unit_rows
from idselect.selection import (
    DEFAULT_GAMMA,
    check_gamma,
    check_selection_inputs,
    check_suppression,
    id_select,
)

# Rows of the similarity matrix computed at once when looking for DivPrune's first token.
_CHUNK = 1024


class Selector(Protocol):
    """Pick min(k, N) token indices, sorted ascending, from features (N, D) and scores (N,)."""

    def __call__(self, features: Tensor, scores: Tensor, k: int) -> Tensor: ...


def _keep_all(features: Tensor) -> Tensor:
    return torch.arange(features.shape[0], device=features.device)


def topk_importance(features: Tensor, scores: Tensor, k: int) -> Tensor:
    """The k highest scores (ties: lower index); the gamma -> infinity limit of ID-Selection."""
    k = check_selection_inputs(features, scores, k)
    if k >= features.shape[0]:
        return _keep_all(features)
    order = torch.sort(scores.to(torch.float32), descending=True, stable=True).indices
    return order[:k].sort().values


@torch.no_grad()
def divprune(features: Tensor, scores: Tensor, k: int) -> Tensor:
    """DivPrune: greedy max-min cosine distance (d = 1 - cos), importance ignored.

    First pick, as in the DivPrune reference code: the most isolated token, i.e. the one whose
    nearest other token is farthest away. Then repeatedly the unpicked token whose distance to
    its nearest picked token is largest. Ties go to the lower index throughout.
    """
    k = check_selection_inputs(features, scores, k)
    n = features.shape[0]
    if k >= n:
        return _keep_all(features)
    x = unit_rows(features.to(torch.float32))
    first = _most_isolated(x)
    nearest = 1.0 - (x @ x[first]).clamp(-1.0, 1.0)  # distance to the picked set
    picked = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen = [first]
    picked[first] = True
    for _ in range(k - 1):
        nxt = nearest.masked_fill(picked, -math.inf).argmax()  # first maximum = lower index
        chosen.append(nxt)
        picked[nxt] = True
        torch.minimum(nearest, 1.0 - (x @ x[nxt]).clamp(-1.0, 1.0), out=nearest)
    return torch.stack(chosen).sort().values


def _most_isolated(x: Tensor) -> Tensor:
    """Index of the token with the largest distance to its nearest other token (chunked N x N)."""
    n = x.shape[0]
    nearest_cos = torch.empty(n, device=x.device)
    for start in range(0, n, _CHUNK):
        sim = x[start : start + _CHUNK] @ x.T
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + start] = -math.inf  # not your own neighbour
        nearest_cos[start : start + _CHUNK] = sim.amax(dim=1).clamp(-1.0, 1.0)
    return (1.0 - nearest_cos).argmax()


def random_select(seed: int = 0) -> Selector:
    """A selector drawing k indices uniformly without replacement, reproducibly from `seed`.

    Each call starts a fresh CPU generator from the seed, so the same (N, k) always gives the same
    indices, on any device and regardless of what ran before.
    """
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed must be an int, got {seed!r}")

    def select(features: Tensor, scores: Tensor, k: int) -> Tensor:
        k = check_selection_inputs(features, scores, k)
        n = features.shape[0]
        if k >= n:
            return _keep_all(features)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        drawn = torch.randperm(n, generator=generator)[:k].sort().values
        return drawn.to(features.device)

    return select


def uniform_pool(features: Tensor, scores: Tensor, k: int) -> Tensor:
    """Uniform spatial sampling: k points spread over the sqrt(N) x sqrt(N) patch grid.

    For a square N the grid gets r = ceil(sqrt(k)) evenly spaced rows, the k points are shared
    between rows as evenly as possible, and each row's points are evenly spaced (cell centres).
    For other N: k evenly spaced raster indices (cell centres of k equal runs).
    """
    k = check_selection_inputs(features, scores, k)
    n = features.shape[0]
    if k >= n:
        return _keep_all(features)
    side = math.isqrt(n)
    if side * side != n:
        picks = [(2 * i + 1) * n // (2 * k) for i in range(k)]
    else:
        rows = math.isqrt(k - 1) + 1  # ceil(sqrt(k)) <= side because k < n
        picks = []
        for r in range(rows):
            y = (2 * r + 1) * side // (2 * rows)
            count = (r + 1) * k // rows - r * k // rows
            picks.extend(y * side + (2 * c + 1) * side // (2 * count) for c in range(count))
    return torch.tensor(picks, dtype=torch.long, device=features.device)


def _id_select_factory(gamma: float = DEFAULT_GAMMA, suppression: str = "subtract") -> Selector:
    return partial(id_select, gamma=check_gamma(gamma), suppression=check_suppression(suppression))


_FACTORIES: dict[str, Callable[..., Selector]] = {
    "id_select": _id_select_factory,
    "topk": lambda: topk_importance,
    "divprune": lambda: divprune,
    "random": random_select,
    "pool": lambda: uniform_pool,
}

# The one registry of selector names: the request option (`idselect.options`), the item fields
# (encoded by index) and the metric label all take their names from here.
SELECTOR_NAMES: tuple[str, ...] = tuple(_FACTORIES)
SELECTORS: Mapping[str, Selector] = MappingProxyType({n: f() for n, f in _FACTORIES.items()})


def get_selector(name: str, **params: object) -> Selector:
    """The selector called `name`, configured by `params` (id_select: gamma, suppression;
    random: seed; the others take none)."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown selector {name!r}; valid names: {', '.join(sorted(_FACTORIES))}")
    factory = _FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as err:
        raise ValueError(
            f"invalid parameters for selector {name!r}: {err} "
            f"(accepted: {', '.join(accepted) or 'none'})"
        ) from None
    return factory(**params)
