"""ID-Selection: greedy importance-first picking with similarity-based score suppression.

Implements the project's ID-Selection specification (design doc `id-selection.md`), per image:
  1. K >= N keeps every token;
  2. scores are min-max normalised to [0, 1] (`normalize_scores`);
  3. w_ij = exp(-gamma * (1 - cos(x_i, x_j))^2) on L2-normalised features;
  4. K times: pick the unpicked token with the highest current score, then suppress the others
     ("subtract": s_j <- max(0, s_j - w_ij * s_i); "multiply": s_j <- s_j * (1 - w_ij));
     ties go to the higher original score, then the lower index;
  5. return the picks sorted ascending (raster order).

All math is fp32 on the input's device. Each pick computes one similarity row (O(N*D) time,
O(N) extra memory): on CPU the N x N GEMM alone costs more than the whole selection at the
budgets that matter (K <= N/10; see benchmarks/selection.py). Inputs are validated with one host
sync; the pick loop itself never syncs, so it runs unchanged on GPUs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Literal

import torch
from torch import Tensor

from idselect.importance import normalize_scores, unit_rows

Suppression = Literal["subtract", "multiply"]
SUPPRESSION_MODES: tuple[str, ...] = ("subtract", "multiply")
DEFAULT_GAMMA = 20.0

# Current score of picked (and padding) tokens: below every normalised score in [0, 1].
_PICKED = -1.0


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


def check_selection_inputs(features: object, scores: object, k: object, where: str = "") -> int:
    """Validate one image's (features (N, D), scores (N,), k); return k as an int.

    Shared by every selector so that they all accept and refuse exactly the same inputs.
    `where` is appended to parameter names in messages (e.g. "[3]" for the 4th image).
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
    if scores.numel():
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


@dataclass(frozen=True)
class _Image:
    """One image prepared for the greedy loop, tokens reordered so ties resolve by position.

    Tokens are stably sorted by original score (descending), so "higher original score, then lower
    index" is simply "first position", which is exactly how torch.max breaks ties.
    """

    x: Tensor  # (N, D) fp32 unit rows, in `order`
    s: Tensor  # (N,) normalised scores, in `order`
    order: Tensor  # (N,) original index of each position
    k: int


def _prepare(features: Tensor, scores: Tensor, k: int) -> _Image:
    original = scores.to(torch.float32)
    order = torch.sort(original, descending=True, stable=True).indices
    x = unit_rows(features.index_select(0, order).to(torch.float32), inplace=True)
    return _Image(x=x, s=normalize_scores(original).index_select(0, order), order=order, k=k)


@dataclass(frozen=True)
class _Kernel:
    """The suppression kernel, with its constants already on the images' device."""

    gamma: float
    mode: str
    minus_one: Tensor
    zero: Tensor

    def row(self, image: _Image, pick: Tensor, out: Tensor) -> None:
        """Write w (subtract) or 1 - w (multiply) between token `pick` and all tokens to `out`.

        Computed per image, never batched across images, so that a batch reproduces single-image
        calls bit for bit: batched matmuls round differently from per-matrix ones.
        """
        query = image.x.index_select(0, pick)[0]
        torch.addmv(self.minus_one, image.x, query, out=out)  # cos - 1
        torch.addcmul(self.zero, out, out, value=-self.gamma, out=out)  # -gamma * d^2
        if self.mode == "subtract":
            out.exp_()
        else:
            out.expm1_().neg_()  # 1 - exp(-gamma d^2), accurate when w is close to 1


@torch.no_grad()
def _greedy(images: list[_Image], gamma: float, mode: str) -> list[Tensor]:
    """Run the greedy picks for images that all have k < N, vectorised across images.

    Images are ordered by k (descending) so the ones still picking at step t are a prefix of the
    batch; finished images simply drop out. Padding positions start at the picked sentinel.
    """
    rank = sorted(range(len(images)), key=lambda i: -images[i].k)
    images = [images[i] for i in rank]
    device = images[0].x.device
    width = max(im.x.shape[0] for im in images)
    k_max = images[0].k

    # state[:, 0] = current scores; state[:, 1] = bound that fixes picked tokens at _PICKED:
    # a floor (0, then _PICKED) for "subtract", a ceiling (+inf, then _PICKED) for "multiply".
    state = torch.full((len(images), 2, width), _PICKED, device=device)
    for b, im in enumerate(images):
        state[b, 0, : im.s.shape[0]] = im.s
        state[b, 1, : im.s.shape[0]] = 0.0 if mode == "subtract" else math.inf
    rows = torch.zeros(len(images), width, device=device)
    scratch = torch.empty_like(rows)
    picks = torch.empty(len(images), k_max, dtype=torch.long, device=device)
    active = len(images)
    kernel = _Kernel(
        gamma, mode, torch.full((), -1.0, device=device), torch.zeros((), device=device)
    )

    for t in range(k_max):
        while images[active - 1].k <= t:
            active -= 1
        st = state[:active]
        current, bound = st[:, 0], st[:, 1]
        value, pick = current.max(dim=1, keepdim=True)  # first maximum = tie rule
        picks[:active, t : t + 1] = pick
        st.scatter_(2, pick.unsqueeze(1).expand(active, 2, 1), _PICKED)
        for b in range(active):
            n = images[b].x.shape[0]
            kernel.row(images[b], pick[b], rows[b, :n])
        if mode == "subtract":
            # Separate mul and sub (not addcmul): each is exactly rounded however it is vectorised.
            torch.mul(rows[:active], value, out=scratch[:active])
            current.sub_(scratch[:active])
            torch.maximum(current, bound, out=current)
        else:
            current.mul_(rows[:active])
            torch.minimum(current, bound, out=current)

    result: list[Tensor] = [torch.empty(0)] * len(images)
    for b, im in enumerate(images):
        result[rank[b]] = im.order.index_select(0, picks[b, : im.k]).sort().values
    return result


def _select(
    images: list[tuple[Tensor, Tensor, int]], gamma: float, suppression: str
) -> list[Tensor]:
    """Keep-all shortcut for k >= N, greedy loop for the rest."""
    out: list[Tensor | None] = [None] * len(images)
    pending: list[int] = []
    for i, (features, _, k) in enumerate(images):
        if k >= features.shape[0]:
            out[i] = torch.arange(features.shape[0], device=features.device)
        else:
            pending.append(i)
    if pending:
        with torch.no_grad():
            prepared = [_prepare(*images[i]) for i in pending]
        for i, picked in zip(pending, _greedy(prepared, gamma, suppression), strict=True):
            out[i] = picked
    return [t for t in out if t is not None]


def id_select(
    features: Tensor,
    scores: Tensor,
    k: int,
    *,
    gamma: float = DEFAULT_GAMMA,
    suppression: Suppression = "subtract",
) -> Tensor:
    """Select min(k, N) of N visual tokens by ID-Selection; indices sorted ascending (int64).

    `features` (N, D) define similarity, `scores` (N,) non-negative importance (any real dtype;
    math is fp32 on the input's device). Deterministic; ties go to the higher original score,
    then the lower index. Zero feature vectors count as orthogonal to everything.
    """
    k = check_selection_inputs(features, scores, k)
    gamma = check_gamma(gamma)
    suppression = check_suppression(suppression)
    return _select([(features, scores, k)], gamma, suppression)[0]


def id_select_batched(
    features: Tensor | Sequence[Tensor],
    scores: Tensor | Sequence[Tensor],
    ks: Sequence[int],
    *,
    gamma: float = DEFAULT_GAMMA,
    suppression: Suppression = "subtract",
) -> list[Tensor]:
    """`id_select` for many images at once, each with its own k; identical results, bit for bit.

    `features` is (B, N, D) or a list of (N_i, D); `scores` is (B, N) or a list of (N_i,); all
    images must share a device. The picks of all images advance together (one loop over
    max k); only the similarity row is computed per image, to stay bit-exact.
    """
    features_list = _as_images(features, "features", 3)
    scores_list = _as_images(scores, "scores", 2)
    ks = _as_budgets(ks)
    if not len(features_list) == len(scores_list) == len(ks):
        raise ValueError(
            f"features, scores and ks must have one entry per image, got "
            f"{len(features_list)}, {len(scores_list)} and {len(ks)}"
        )
    gamma = check_gamma(gamma)
    suppression = check_suppression(suppression)
    images = []
    for i, (f, s, k) in enumerate(zip(features_list, scores_list, ks, strict=True)):
        images.append((f, s, check_selection_inputs(f, s, k, where=f"[{i}]")))
    devices = {f.device for f, _, _ in images}
    if len(devices) > 1:
        raise ValueError(f"all images must be on one device, got {sorted(map(str, devices))}")
    return _select(images, gamma, suppression) if images else []


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
