"""Count the operations a call dispatches: the CPU-visible proxy for GPU kernel launches.

`count_dispatches(fn)` profiles one call of `fn` (after a warm-up call) with torch's profiler and
counts the outermost aten ops that do work: views, allocations and metadata queries are left out,
and an op counts once however it is implemented inside (`aten::to`, `aten::reshape` and the like
only when they copy). A
`record_function` range named in KERNEL_RANGES (our Triton launch) counts as one launch, whatever
Triton's CPU interpreter does inside it. On CUDA, `count_cuda_kernels` counts the kernels the GPU
really ran.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

KERNEL_RANGES = frozenset({"idselect::triton_greedy_kernel"})
_NO_LAUNCH = frozenset(
    f"aten::{name}"
    for name in [
        "empty",
        "empty_strided",
        "empty_like",
        "view",
        "as_strided",
        "expand",
        "expand_as",
        "slice",
        "select",
        "unsqueeze",
        "squeeze",
        "t",
        "numpy_T",
        "transpose",
        "permute",
        "_reshape_alias",
        "alias",
        "detach",
        "detach_",
        "unbind",
        "split",
        "split_with_sizes",
        "unsafe_split",
        "narrow",
        "lift_fresh",
        "resize_",
        "result_type",
        "_unsafe_view",
        "promote_types",
        "resolve_conj",
        "resolve_neg",
        "item",
        "_local_scalar_dense",
        "is_nonzero",
    ]
)
_ONLY_WHEN_COPYING = frozenset({"aten::to", "aten::contiguous", "aten::reshape", "aten::flatten"})


def _counted(name: str) -> bool:
    return (name.startswith("aten::") or name in KERNEL_RANGES) and name not in _NO_LAUNCH


def _copies(event) -> bool:  # noqa: ANN001 - a profiler event
    return any(c.name == "aten::copy_" or _copies(c) for c in event.cpu_children)


def count_dispatches(fn: Callable[[], object]) -> Counter[str]:
    """Outermost work-doing ops of one `fn()` call, by name."""
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter[str] = Counter()
    for event in prof.events():
        if not _counted(event.name):
            continue
        parent, nested = event.cpu_parent, False
        while parent is not None and not nested:
            nested = _counted(parent.name)
            parent = parent.cpu_parent
        if nested or (event.name in _ONLY_WHEN_COPYING and not _copies(event)):
            continue
        counts[event.name] += 1
    return counts


def count_cuda_kernels(fn: Callable[[], object]) -> int:
    """Kernels the GPU ran during one `fn()` call (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(
        1
        for event in prof.events()
        if event.device_type == torch.autograd.DeviceType.CUDA
        and not event.name.startswith("Memcpy")
    )
