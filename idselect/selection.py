"""ID-Selection: greedy importance-first picking with similarity-based score suppression.

Implements the project's ID-Selection specification (design doc `id-selection.md`), per image:
  1. K >= N keeps every token;
  2. scores are min-max normalised to [0, 1] (`normalize_scores`);
  3. w_ij = exp(-gamma * (1 - cos(x_i, x_j))^2) on L2-normalised features;
  4. K times: pick the unpicked token with the highest current score, then suppress the others
     ("subtract": s_j <- max(0, s_j - w_ij * s_i); "multiply": s_j <- s_j * (1 - w_ij));
     ties go to the higher original score, then the lower index;
  5. return the picks sorted ascending (raster order).

All math is fp32 on the input's device. Two backends run the greedy loop over one shared
preparation (`selection_batch.py`: tie order, normalised scores, the N x N weight matrix):
`torch` issues a fixed handful of ops per pick for the whole batch, `triton`
(`selection_triton.py`) runs all picks of a batch in one kernel launch. They read the same
weights and round the same way, so they pick the same tokens. `auto` (the default) takes Triton
for CUDA tensors when triton imports and torch otherwise; `IDSELECT_SELECTION_BACKEND` overrides
that choice for a deployment. Inputs are validated with one host sync per call; nothing after
it syncs, so the same code runs on GPUs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from functools import cache
from numbers import Integral, Real
from types import ModuleType
from typing import Literal

import torch
from torch import Tensor

from idselect import selection_batch

Suppression = Literal["subtract", "multiply"]
SUPPRESSION_MODES: tuple[str, ...] = ("subtract", "multiply")
DEFAULT_GAMMA = 20.0

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")
BACKEND_ENV = "IDSELECT_SELECTION_BACKEND"

GreedyLoop = Callable[[selection_batch.Batch], Tensor]


def check_k(k: object, name: str = "k") -> int:
    """A budget must be a true int >= 1 (bools and floats such as 16.0 are refused)."""
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"{name} must be an int >= 1, got {type(k).__name__} {k!r}")
    if k < 1:
        raise ValueError(f"{name} must be an int >= 1, got {int(k)}")
    return int(k)


def check_gamma(gamma: object) -> float:
    """gamma scales the suppression kernel; it must be a finite positive number."""
    if isinstance(gamma, bool) or not isinstance(gamma, Real) or not math.isfinite(gamma):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}")
    return float(gamma)


def check_suppression(suppression: object) -> str:
    """Only the two suppression rules of the spec exist."""
    if suppression not in SUPPRESSION_MODES:
        raise ValueError(f"suppression must be one of {SUPPRESSION_MODES}, got {suppression!r}")
    return str(suppression)


def check_backend(backend: object, name: str = "backend") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{name} must be one of {BACKENDS}, got {backend!r}")
    return str(backend)


@cache
def _triton_module() -> ModuleType | None:
    """`idselect.selection_triton`, or None when triton does not import."""
    try:
        from idselect import selection_triton
    except ImportError:
        return None
    return selection_triton


def resolve_backend(backend: str, device: torch.device) -> str:
    """"torch" or "triton" for tensors on `device`; explains why when "triton" cannot run there.

    "auto" takes IDSELECT_SELECTION_BACKEND when it is set, else Triton for CUDA tensors when
    triton imports, else torch (without importing triton).
    """
    backend = check_backend(backend)
    if backend == "auto":
        backend = check_backend(os.environ.get(BACKEND_ENV) or "auto", BACKEND_ENV)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_module() is not None else "torch"
    if backend == "triton":
        triton_module = _triton_module()
        if triton_module is None:
            raise ValueError("the triton selection backend needs triton, which does not import")
        if device.type != "cuda" and not triton_module.is_interpreted():
            raise ValueError(
                f"the triton selection backend runs on CUDA tensors (or on CPU with "
                f"TRITON_INTERPRET=1 set before triton is imported); got {device.type} tensors"
            )
    return backend


def _greedy_loop(backend: str, device: torch.device) -> GreedyLoop:
    if resolve_backend(backend, device) == "triton":
        return _triton_module().greedy
    return selection_batch.torch_greedy


def check_selection_inputs(
    features: object, scores: object, k: object, where: str = "", *, values: bool = True
) -> int:
    """Validate one image's (features (N, D), scores (N,), k); return k as an int.

    Shared by every selector so that they all accept and refuse exactly the same inputs.
    `where` is appended to parameter names in messages (e.g. "[3]" for the 4th image).
    `values=False` checks types and shapes only (no device work): the caller checks the values
    of a whole batch at once.
    """
    f_name, s_name = f"features{where}", f"scores{where}"
    k = check_k(k, f"k{where}")
    for name, t, rank, layout in ((f_name, features, 2, "(N, D)"), (s_name, scores, 1, "(N,)")):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_complex():
            raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    assert isinstance(features, Tensor) and isinstance(scores, Tensor)
    if features.shape[0] != scores.shape[0]:
        raise ValueError(
            f"{f_name} has {features.shape[0]} tokens but {s_name} has {scores.shape[0]}"
        )
    if features.shape[1] == 0:
        raise ValueError(f"{f_name} must have at least one feature dimension (D >= 1)")
    if features.device != scores.device:
        raise ValueError(f"{f_name} is on {features.device} but {s_name} is on {scores.device}")
    if values and scores.numel():
        # aminmax propagates NaN and exposes inf: one cheap pass and one host sync per tensor pair.
        f_lo, f_hi = torch.aminmax(features)
        s_lo, s_hi = torch.aminmax(scores)
        stats = torch.stack([v.to(torch.float64) for v in (f_lo, f_hi, s_lo, s_hi)]).tolist()
        if not (math.isfinite(stats[0]) and math.isfinite(stats[1])):
            raise ValueError(f"{f_name} must be finite (found NaN or inf)")
        if not (math.isfinite(stats[2]) and math.isfinite(stats[3])):
            raise ValueError(f"{s_name} must be finite (found NaN or inf)")
        if stats[2] < 0:
            raise ValueError(f"{s_name} must be non-negative importance, found minimum {stats[2]}")
    return k


def _check_values(features: Sequence[Tensor], scores: Sequence[Tensor], indexed: bool) -> None:
    """Finite features, finite non-negative scores: one reduction pass and one host sync for the
    whole batch; only a failing batch is scanned per image, to name the image in the message."""
    if not any(s.numel() for s in scores):
        return
    flat = [
        t[0].reshape(-1) if len(t) == 1 else torch.cat([v.reshape(-1) for v in t])
        for t in (features, scores)
    ]
    # aminmax propagates NaN and exposes inf.
    bounds = torch.stack([v.to(torch.float64) for t in flat for v in torch.aminmax(t)]).tolist()
    if all(math.isfinite(v) for v in bounds) and bounds[2] >= 0:
        return
    for i, (f, s) in enumerate(zip(features, scores, strict=True)):
        check_selection_inputs(f, s, 1, where=f"[{i}]" if indexed else "")


def _select(
    images: list[tuple[Tensor, Tensor, int]], gamma: float, suppression: str, backend: str
) -> list[Tensor]:
    """Keep-all for k >= N; the greedy loop for the rest, in as few prepared batches as fit."""
    loop = _greedy_loop(backend, images[0][0].device)  # refuses a backend that cannot run here
    out: list[Tensor | None] = [None] * len(images)
    pending = [i for i, (f, _, k) in enumerate(images) if k < f.shape[0]]
    whole = [i for i, (f, _, k) in enumerate(images) if k >= f.shape[0]]
    if whole:
        span = torch.arange(max(images[i][0].shape[0] for i in whole), device=images[0][0].device)
        for i in whole:
            out[i] = span[: images[i][0].shape[0]]
    if pending:
        shapes = [tuple(images[i][0].shape) for i in pending]
        with torch.no_grad():
            for chunk in selection_batch.chunks(shapes):
                members = [pending[j] for j in chunk]
                batch = selection_batch.prepare([images[i] for i in members], gamma, suppression)
                if batch.weights is None:  # too large for a weight matrix: rows per pick
                    positions = selection_batch.torch_greedy(batch)
                else:
                    positions = loop(batch)
                picked = selection_batch.finish(batch, positions)
                for i, indices in zip(members, picked, strict=True):
                    out[i] = indices
    return [t for t in out if t is not None]


def id_select(
    features: Tensor,
    scores: Tensor,
    k: int,
    *,
    gamma: float = DEFAULT_GAMMA,
    suppression: Suppression = "subtract",
    backend: Backend = "auto",
) -> Tensor:
    """Select min(k, N) of N visual tokens by ID-Selection; indices sorted ascending (int64).

    `features` (N, D) define similarity, `scores` (N,) non-negative importance (any real dtype;
    math is fp32 on the input's device). Deterministic; ties go to the higher original score,
    then the lower index. Zero feature vectors count as orthogonal to everything. `backend`
    ("auto", "torch", "triton") chooses how the greedy loop runs, never what it picks.
    """
    return _validated_select([features], [scores], [k], gamma, suppression, backend, False)[0]


def id_select_batched(
    features: Tensor | Sequence[Tensor],
    scores: Tensor | Sequence[Tensor],
    ks: Sequence[int],
    *,
    gamma: float = DEFAULT_GAMMA,
    suppression: Suppression = "subtract",
    backend: Backend = "auto",
) -> list[Tensor]:
    """`id_select` for many images at once, each with its own k; identical results, bit for bit.

    `features` is (B, N, D) or a list of (N_i, D); `scores` is (B, N) or a list of (N_i,); all
    images must share a device. The picks of all images advance together, with the same number
    of ops per pick (torch) or one kernel launch (triton) whatever the batch size.
    """
    features_list = _as_images(features, "features", 3)
    scores_list = _as_images(scores, "scores", 2)
    ks = _as_budgets(ks)
    if not len(features_list) == len(scores_list) == len(ks):
        raise ValueError(
            f"features, scores and ks must have one entry per image, got "
            f"{len(features_list)}, {len(scores_list)} and {len(ks)}"
        )
    return _validated_select(features_list, scores_list, ks, gamma, suppression, backend, True)


def _validated_select(
    features: list[Tensor],
    scores: list[Tensor],
    ks: list[object],
    gamma: object,
    suppression: object,
    backend: object,
    indexed: bool,
) -> list[Tensor]:
    """Validate everything (messages name images as `[i]` when `indexed`), then select."""
    gamma = check_gamma(gamma)
    suppression = check_suppression(suppression)
    backend = check_backend(backend)
    images = []
    for i, (f, s, k) in enumerate(zip(features, scores, ks, strict=True)):
        where = f"[{i}]" if indexed else ""
        images.append((f, s, check_selection_inputs(f, s, k, where, values=False)))
    devices = {f.device for f, _, _ in images}
    if len(devices) > 1:
        raise ValueError(f"all images must be on one device, got {sorted(map(str, devices))}")
    if not images:
        return []
    _check_values(features, scores, indexed)
    return _select(images, gamma, suppression, backend)


def _as_budgets(ks: object) -> list[object]:
    if isinstance(ks, Tensor):
        return ks.flatten().tolist()
    if isinstance(ks, Sequence) and not isinstance(ks, str | bytes):
        return list(ks)
    raise ValueError(f"ks must be a sequence of ints (one per image), got {type(ks).__name__}")


def _as_images(value: object, name: str, stacked_rank: int) -> list[Tensor]:
    if isinstance(value, Tensor):
        if value.dim() != stacked_rank:
            raise ValueError(
                f"{name} must be a {stacked_rank}-D tensor or a sequence of per-image tensors, "
                f"got shape {tuple(value.shape)}"
            )
        return list(value.unbind(0))
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise ValueError(
        f"{name} must be a tensor or a sequence of tensors, got {type(value).__name__}"
    )
