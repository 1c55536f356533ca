"""The Triton backend of ID-Selection: all K greedy picks of a batch in one kernel launch.

One program per image keeps that image's current scores in registers (up to
`selection_batch.MATRIX_MAX_TOKENS` tokens) and runs its K picks inside the kernel: argmax (first
maximum, i.e. the tie rule, since tokens are already in tie order), store the pick, load the
picked token's row of the precomputed weight matrix, suppress. The batch's ragged N and K are read
per program, so one launch covers any mix of images, and nothing is synchronised with the host.

The kernel reads the same weight matrix and normalised scores as the torch loop
(`selection_batch.prepare`) and applies the same exactly rounded fp32 operations in the same
order, so both backends pick the same tokens bit for bit. That needs floating-point contraction
off: fusing `s - w * v` into one FMA would round differently from torch's separate mul and sub,
hence `enable_fp_fusion=False` at launch.

Importing this module imports triton. With TRITON_INTERPRET=1 set before that import the kernel
runs through Triton's interpreter on CPU tensors (tests); otherwise it needs CUDA tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from idselect.selection_batch import PICKED, Batch

# Register blocks above this get more warps, so each thread holds at most 16 scores.
_WARPS_BY_BLOCK = ((1024, 4), (4096, 8))
# No FMA contraction: torch rounds the product and the difference of `s - w * v` separately.
COMPILE_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _greedy_kernel(
    weights_ptr,
    scores_ptr,
    n_ptr,
    k_ptr,
    picks_ptr,
    stride_wb,
    stride_wr,
    stride_sb,
    stride_pb,
    PICKED_VALUE: tl.constexpr,
    BLOCK: tl.constexpr,
    SUBTRACT: tl.constexpr,
):
    image = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + image)
    k = tl.load(k_ptr + image)
    offs = tl.arange(0, BLOCK)
    real = offs < n
    current = tl.load(scores_ptr + image * stride_sb + offs, mask=real, other=PICKED_VALUE)
    done = offs >= n  # padding behaves like a token picked long ago
    rows = weights_ptr + image * stride_wb
    for t in range(k):
        value, pick = tl.max(
            current, axis=0, return_indices=True, return_indices_tie_break_left=True
        )
        tl.store(picks_ptr + image * stride_pb + t, pick.to(tl.int64))
        row = tl.load(rows + pick.to(tl.int64) * stride_wr + offs, mask=real, other=0.0)
        done = done | (offs == pick)
        if SUBTRACT:  # noqa: SIM108 - a compile-time branch
            current = tl.maximum(current - row * value, 0.0)
        else:
            current = current * row
        current = tl.where(done, PICKED_VALUE, current)


def is_interpreted() -> bool:
    """True when triton was imported with TRITON_INTERPRET=1 (kernels run on CPU tensors)."""
    return not isinstance(_greedy_kernel, triton.runtime.JITFunction)


def greedy(batch: Batch) -> Tensor:
    """Picked positions (B, max k) int64, one kernel launch; rows past an image's k are 0."""
    assert batch.weights is not None, "the Triton loop reads the precomputed weight matrix"
    images, width = batch.scores.shape
    block = triton.next_power_of_2(width)
    warps = next(w for limit, w in _WARPS_BY_BLOCK if block <= limit)
    picks = torch.zeros(images, max(batch.k), dtype=torch.int64, device=batch.scores.device)
    weights, scores = batch.weights, batch.scores
    with torch.profiler.record_function("idselect::triton_greedy_kernel"):
        _greedy_kernel[(images,)](
            weights,
            scores,
            batch.n_tensor,
            batch.k_tensor,
            picks,
            weights.stride(0),
            weights.stride(1),
            scores.stride(0),
            picks.stride(0),
            PICKED_VALUE=PICKED,
            BLOCK=block,
            SUBTRACT=batch.suppression == "subtract",
            num_warps=warps,
            **COMPILE_OPTIONS,
        )
    return picks
