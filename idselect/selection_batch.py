"""ID-Selection's greedy loop over a batch of images, with a fixed number of ops per pick.

`prepare` turns a batch of images into padded tensors once: tokens stably sorted by original
score (so the tie rule "higher original score, then lower index" is "first position", which is
how an argmax breaks ties), min-max normalised scores and, for images of up to
`MATRIX_MAX_TOKENS` tokens, the suppression weights between every pair of tokens. `torch_greedy`
then runs the K picks with the same few ops per pick whatever the batch size (the rows of all
images are gathered in one op), and `finish` maps picked positions back to sorted indices.
The Triton backend (`selection_triton.py`) replaces `torch_greedy` with one kernel launch and
reads the same tensors, so both backends pick identical tokens.

Every step is one op for the whole batch, whatever the number of images: the similarity of every
image is one batched GEMM over the zero-padded features, everything else is elementwise, a
gather, or a reduction along one image's own row. Batched results equal single-image ones bit
for bit on CPU (each image's dot products do not depend on the padding or the batch: checked in
tests/test_selection_backends.py); on CUDA that is unverified here (no GPU), and the two backends
agree bit for bit there too, as they read the same weights. Padding tokens start (and stay) at
the picked sentinel, below every real score.

Larger images (Qwen2.5-VL at several megapixels) would need a weight matrix of over 64 MiB each:
they are prepared without it and compute their similarity row per pick instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from idselect.importance import unit_rows

# Current score of picked (and padding) tokens: below every normalised score in [0, 1].
PICKED = -1.0
# Largest image with a precomputed weight matrix (4096^2 fp32 = 64 MiB); also the Triton kernel's
# register block limit.
MATRIX_MAX_TOKENS = 4096
# Weight matrices of one prepared batch stay under this; bigger batches are split.
_BATCH_BYTES = 256 << 20


@dataclass(frozen=True)
class Batch:
    """A batch of images ready for the greedy loop, tokens in tie order, padded to `width`."""

    scores: Tensor  # (B, M) fp32 normalised scores; padding at PICKED
    order: Tensor  # (B, M) int64 original index of each position
    weights: Tensor | None  # (B, M, M) fp32 w (subtract) or 1 - w (multiply), or None
    features: Tensor | None  # (B, M, D) fp32 unit rows, kept only when weights is None
    n: tuple[int, ...]
    k: tuple[int, ...]
    n_tensor: Tensor  # (B,) int64, on the batch's device
    k_tensor: Tensor  # (B,) int64
    gamma: float
    suppression: str


def chunks(shapes: Sequence[tuple[int, int]]) -> Iterator[list[int]]:
    """Split image indices, given each image's (N, D), into batches that share D: matrix-sized
    images by size, under `_BATCH_BYTES` each, larger images one by one. Which batch an image
    lands in never changes its picks."""
    small = [i for i, (n, _) in enumerate(shapes) if n <= MATRIX_MAX_TOKENS]
    small.sort(key=lambda i: (shapes[i][1], shapes[i][0]))
    batch: list[int] = []
    for i in small:
        n, d = shapes[i]  # sorted by (D, N): the newest image is the widest
        if batch and (shapes[batch[0]][1] != d or (len(batch) + 1) * n * n * 4 > _BATCH_BYTES):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
    for i, (n, _) in enumerate(shapes):
        if n > MATRIX_MAX_TOKENS:
            yield [i]


def _padded(tensors: Sequence[Tensor], width: int, fill: float) -> Tensor:
    """(B, width, ...) fp32 from per-image (N_i, ...) tensors, `fill` past each N_i."""
    if all(t.shape[0] == width for t in tensors):
        return torch.stack(list(tensors)).to(torch.float32)
    device = tensors[0].device
    out = torch.full((len(tensors), width, *tensors[0].shape[1:]), fill, device=device)
    rows = [b * width + j for b, t in enumerate(tensors) for j in range(t.shape[0])]
    flat = torch.cat(list(tensors)).to(torch.float32)
    out.flatten(0, 1).index_copy_(0, host_to_device(rows, device), flat)
    return out


def host_to_device(values: list, device: torch.device) -> Tensor:
    """An int64 tensor of host values on `device`, copied without waiting for the device."""
    tensor = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _weights(x: Tensor, gamma: float, suppression: str) -> Tensor:
    """w_ij = exp(-gamma (1 - cos)^2) (subtract) or 1 - w_ij (multiply) for each image: one
    batched GEMM (padding rows are zero; their weights are never read)."""
    return _to_weights(torch.bmm(x, x.transpose(1, 2)), gamma, suppression)


def prepare(
    images: Sequence[tuple[Tensor, Tensor, int]], gamma: float, suppression: str
) -> Batch:
    """Pad, sort into tie order, normalise; weights for images of <= MATRIX_MAX_TOKENS tokens.

    Every image must have 1 <= k < N and inputs already validated.
    """
    n = tuple(f.shape[0] for f, _, _ in images)
    k = tuple(k for _, _, k in images)
    width = max(n)
    device = images[0][0].device
    sizes = host_to_device([n, k, [size - 1 for size in n]], device)
    raw = _padded([s for _, s, _ in images], width, -math.inf)  # padding sorts last
    order = torch.sort(raw, dim=1, descending=True, stable=True).indices
    ordered = raw.gather(1, order)
    # Normalised as `importance.normalize_scores` does (same ops, so the same bits):
    # the max is the first position, the min the last real one.
    high = ordered[:, :1]
    low = ordered.gather(1, sizes[2].unsqueeze(1))
    span = high - low
    flat = span == 0
    scaled = (ordered - low).div_(span.masked_fill(flat, 1.0)).masked_fill_(flat, 1.0)
    scores = scaled.masked_fill_(ordered == -math.inf, PICKED)

    x = _padded([f for f, _, _ in images], width, 0.0)
    x = unit_rows(x.gather(1, order.unsqueeze(-1).expand_as(x)), inplace=True)
    matrix = width <= MATRIX_MAX_TOKENS
    return Batch(
        scores=scores,
        order=order,
        weights=_weights(x, gamma, suppression) if matrix else None,
        features=None if matrix else x,
        n=n,
        k=k,
        n_tensor=sizes[0],
        k_tensor=sizes[1],
        gamma=gamma,
        suppression=suppression,
    )


@torch.no_grad()
def torch_greedy(batch: Batch) -> Tensor:
    """Picked positions (B, max k) int64; an image's row past its own k holds filler picks.

    Per pick, for all images at once: one max (first maximum = tie rule), one scatter marking
    the picks, one gather of their weight rows and two or three elementwise updates.
    """
    images, width = batch.scores.shape
    k_max = max(batch.k)
    subtract = batch.suppression == "subtract"
    # state[:, 0] = current scores; state[:, 1] = bound that fixes picked tokens at PICKED:
    # a floor (0, then PICKED) for "subtract", a ceiling (+inf, then PICKED) for "multiply".
    real = batch.scores >= 0
    bound = torch.where(real, 0.0 if subtract else math.inf, PICKED)
    state = torch.stack([batch.scores, bound], dim=1)
    current, bound = state[:, 0], state[:, 1]
    picks = torch.empty(k_max, images, dtype=torch.int64, device=state.device)
    value = torch.empty(images, device=state.device)
    row = torch.empty(images, 1, width, device=state.device)
    scratch = torch.empty(images, width, device=state.device)
    for t in range(k_max):
        torch.max(current, dim=1, out=(value, picks[t]))
        index = picks[t].view(images, 1, 1)
        state.scatter_(2, index.expand(images, 2, 1), PICKED)
        if batch.weights is not None:
            torch.gather(batch.weights, 1, index.expand(images, 1, width), out=row)
        else:
            _stream_row(batch, index, out=row)
        if subtract:
            # Separate mul and sub (not addcmul): each is exactly rounded, as in the Triton kernel.
            torch.mul(row[:, 0], value.unsqueeze(1), out=scratch)
            current.sub_(scratch)
            torch.maximum(current, bound, out=current)
        else:
            current.mul_(row[:, 0])
            torch.minimum(current, bound, out=current)
    return picks.T


def _stream_row(batch: Batch, index: Tensor, out: Tensor) -> None:
    """The picked tokens' weight rows computed on the fly, for images without a weight matrix."""
    x = batch.features
    assert x is not None
    query = torch.gather(x, 1, index.expand(-1, 1, x.shape[2]))
    torch.bmm(query, x.transpose(1, 2), out=out)
    _to_weights(out, batch.gamma, batch.suppression)


def _to_weights(cos: Tensor, gamma: float, suppression: str) -> Tensor:
    """In place: cosines -> w = exp(-gamma (1 - cos)^2) (subtract) or 1 - w (multiply)."""
    d2 = cos.sub_(1.0).square_().mul_(-gamma)
    return d2.exp_() if suppression == "subtract" else d2.expm1_().neg_()


def finish(batch: Batch, positions: Tensor) -> list[Tensor]:
    """Each image's first k picked positions as original indices, sorted ascending (int64)."""
    picked = batch.order.gather(1, positions)
    if len(set(batch.k)) > 1:
        steps = torch.arange(positions.shape[1], device=positions.device)
        late = steps.unsqueeze(0) >= batch.k_tensor.unsqueeze(1)
        picked = picked.masked_fill(late, torch.iinfo(torch.int64).max)  # sorts past the real ones
    ordered = picked.sort(dim=1).values
    return [ordered[b, :k] for b, k in enumerate(batch.k)]
