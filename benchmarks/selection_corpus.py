"""Random selection cases that stress what the two backends must agree on, bit for bit.

Ragged batches of 1-4 images mixing exact ties and duplicate features (an integer grid), few
distinct features, all-equal scores and continuous low-dimensional features, in fp32, fp16 and
bf16, with budgets from 1 to past N (keep-all), alternating both suppression modes. Used by the
tests (CPU, Triton interpreted) and by `benchmarks/selection.py --device cuda` (compiled).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

KINDS = ("grid", "duplicates", "equal", "random")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Case = list[tuple[Tensor, Tensor, int]]


def random_image(
    gen: torch.Generator, kind: str, n: int, d: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Features (n, d) and scores (n,) of one of the corpus' kinds of image."""
    if kind == "grid":  # coarse integers: exact ties and exact duplicate features
        x = torch.randint(-2, 3, (n, d), generator=gen).float()
        s = torch.randint(0, 4, (n,), generator=gen).float()
    elif kind == "duplicates":  # few distinct features, continuous scores
        base = torch.randn(max(1, n // 4), d, generator=gen)
        x = base[torch.randint(0, base.shape[0], (n,), generator=gen)]
        s = torch.rand(n, generator=gen)
    elif kind == "equal":  # all-equal scores: only similarity decides
        x = torch.randn(n, d, generator=gen)
        s = torch.full((n,), 3.0)
    else:  # continuous, low-dimensional: many close neighbours
        x = torch.randn(n, d, generator=gen)
        s = torch.rand(n, generator=gen) * 10
    return x.to(dtype), s.to(dtype)


def corpus(count: int, seed: int = 2026, max_n: int = 70) -> Iterator[tuple[int, Case, str]]:
    """(case number, [(features, scores, k) per image], suppression mode), on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    for case in range(count):
        batch: Case = []
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            n = int(torch.randint(1, max_n, (1,), generator=gen))
            kind = KINDS[(case + len(batch)) % len(KINDS)]
            dtype = DTYPES[case % len(DTYPES)]
            x, s = random_image(gen, kind, n, int(torch.randint(1, 9, (1,), generator=gen)), dtype)
            batch.append((x, s, int(torch.randint(1, n + 3, (1,), generator=gen))))
        yield case, batch, ("subtract", "multiply")[case % 2]
