"""The torch and Triton selection backends: identical picks, backend choice, ops per call.

The Triton kernel runs through Triton's CPU interpreter here (no GPU in CI): that checks its
logic, tie rule and ragged-batch handling bit for bit against the torch loop. The compiled kernel
cannot run without a GPU; it is compiled ahead of time for sm_80 and sm_90 instead, which checks
that it builds and that no fused multiply-add changes its rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from benchmarks.dispatch_count import count_dispatches
from benchmarks.selection_corpus import corpus
from idselect import selection_batch
from idselect.selection import BACKEND_ENV, id_select, id_select_batched, resolve_backend
from tests.test_selection import reference
from tests.triton_interpreter import interpreted

CPU = torch.device("cpu")


def test_corpus_of_240_cases_picks_identically_on_both_backends():
    cases = 0
    for case, batch, mode in corpus(240):
        xs, ss, ks = map(list, zip(*batch, strict=True))
        on_torch = id_select_batched(xs, ss, ks, suppression=mode, backend="torch")
        with interpreted():
            on_triton = id_select_batched(xs, ss, ks, suppression=mode, backend="triton")
        assert [t.tolist() for t in on_triton] == [t.tolist() for t in on_torch], case
        assert [t.dtype for t in on_triton] == [torch.int64] * len(batch)
        cases += 1
    assert cases == 240


def test_both_backends_match_the_fp64_reference_at_llava_size():
    gen = torch.Generator().manual_seed(11)
    x, s = torch.randn(576, 48, generator=gen), torch.rand(576, generator=gen)
    expected = reference(x, s, 24)
    assert id_select(x, s, 24, backend="torch").tolist() == expected
    with interpreted():
        assert id_select(x, s, 24, backend="triton").tolist() == expected


def test_images_too_large_for_a_weight_matrix_stream_their_rows():
    # N > MATRIX_MAX_TOKENS: no N x N matrix; both backends take the per-pick row path.
    gen = torch.Generator().manual_seed(5)
    n = selection_batch.MATRIX_MAX_TOKENS + 7
    x, s = torch.randn(n, 6, generator=gen), torch.rand(n, generator=gen)
    small = (torch.randn(50, 6, generator=gen), torch.rand(50, generator=gen))
    expected = reference(x, s, 6)
    assert id_select(x, s, 6).tolist() == expected
    with interpreted():
        both = id_select_batched([small[0], x], [small[1], s], [9, 6], backend="triton")
    assert both[1].tolist() == expected
    assert both[0].tolist() == id_select(*small, 9).tolist()


def test_batches_split_by_memory_pick_the_same(monkeypatch: pytest.MonkeyPatch):
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, 4, generator=gen) for n in (30, 60, 45, 60)]
    ss = [torch.rand(x.shape[0], generator=gen) for x in xs]
    whole = id_select_batched(xs, ss, [5, 7, 3, 7])
    # Room for one 60-token matrix per batch: four separate batches.
    monkeypatch.setattr(selection_batch, "_BATCH_BYTES", 60 * 60 * 4)
    assert len(list(selection_batch.chunks([tuple(x.shape) for x in xs]))) == 4
    split = id_select_batched(xs, ss, [5, 7, 3, 7])
    assert [t.tolist() for t in split] == [t.tolist() for t in whole]


# --- choosing the backend -----------------------------------------------------------------


def test_auto_is_torch_on_cpu_and_follows_the_deployment_override(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert resolve_backend("auto", CPU) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert resolve_backend("auto", CPU) == "torch"
    with interpreted():
        monkeypatch.setenv(BACKEND_ENV, "triton")
        assert resolve_backend("auto", CPU) == "triton"
        assert resolve_backend("torch", CPU) == "torch"  # an explicit backend wins


@pytest.mark.parametrize("value", ["cuda", "Triton", "none"])
def test_a_bad_override_is_refused_by_name(monkeypatch: pytest.MonkeyPatch, value: str):
    monkeypatch.setenv(BACKEND_ENV, value)
    with pytest.raises(ValueError, match=BACKEND_ENV):
        id_select(torch.randn(5, 3), torch.rand(5), 2)


@pytest.mark.parametrize("backend", ["cuda", "", None, 1])
def test_a_bad_backend_argument_is_refused(backend: object):
    with pytest.raises(ValueError, match="backend must be one of"):
        id_select(torch.randn(5, 3), torch.rand(5), 2, backend=backend)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend must be one of"):
        id_select_batched([torch.randn(5, 3)], [torch.rand(5)], [2], backend=backend)  # type: ignore[arg-type]


def test_triton_refuses_cpu_tensors_without_the_interpreter():
    # A fresh process: the kernel compiled for real (no TRITON_INTERPRET) cannot take CPU tensors.
    code = (
        "import torch\n"
        "from idselect.selection import id_select\n"
        "try:\n"
        "    id_select(torch.randn(5, 3), torch.rand(5), 2, backend='triton')\n"
        "except ValueError as e:\n"
        "    print('refused:', e)\n"
        "print('auto:', id_select(torch.randn(5, 3), torch.rand(5), 2).tolist() is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", BACKEND_ENV)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "refused: the triton selection backend runs on CUDA tensors" in done.stdout
    assert "auto: True" in done.stdout


COMPILE_FOR_GPUS = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from idselect import selection_triton as st
assert not st.is_interpreted()
signature = {name: "*fp32" for name in ("weights_ptr", "scores_ptr")}
signature |= {name: "*i64" for name in ("n_ptr", "k_ptr", "picks_ptr")}
signature |= {name: "i64" for name in ("stride_wb", "stride_wr", "stride_sb", "stride_pb")}
signature |= {name: "constexpr" for name in ("PICKED_VALUE", "BLOCK", "SUBTRACT")}
for arch in (80, 90):
    for subtract in (True, False):
        for fusion in (st.COMPILE_OPTIONS, {}):
            source = ASTSource(st._greedy_kernel, signature, constexprs={
                "PICKED_VALUE": st.PICKED, "BLOCK": 4096, "SUBTRACT": subtract})
            kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                    options={"num_warps": 8, **fusion})
            assert kernel.asm["cubin"], arch
            fmas = kernel.asm["ptx"].count("fma.rn.f32")
            print(f"sm_{arch} subtract={subtract} fusion={'off' if fusion else 'on'} fma={fmas}")
"""


def test_the_kernel_compiles_for_gpus_without_fused_multiply_add():
    # No GPU here, but Triton compiles ahead of time for a named target (PTX, then ptxas to a
    # cubin): the compiled path type-checks for A100 (sm_80) and H100/H200 (sm_90), and with our
    # options no FMA fuses the `s - w * v` update (with Triton's default it would).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_GPUS], capture_output=True, text=True, env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for arch in (80, 90):
        assert f"sm_{arch} subtract=True fusion=off fma=0" in lines, lines
        assert f"sm_{arch} subtract=False fusion=off fma=0" in lines, lines
    fused = [line for line in done.stdout.splitlines() if "subtract=True fusion=on" in line]
    assert fused and all("fma=0" not in line for line in fused)  # the option matters


# --- operations per call (the CPU-visible proxy for GPU kernel launches) ------------------


def dispatches(backend: str, images: int, k: int, n: int = 576, d: int = 64) -> Counter[str]:
    gen = torch.Generator().manual_seed(images * 1000 + k)
    x, s = torch.randn(images, n, d, generator=gen), torch.rand(images, n, generator=gen)
    return count_dispatches(lambda: id_select_batched(x, s, [k] * images, backend=backend))


def test_torch_backend_ops_per_pick_do_not_grow_with_the_batch():
    total = {(b, k): dispatches("torch", b, k).total() for b in (1, 8, 16) for k in (16, 64)}
    for k in (16, 64):
        assert total[1, k] / k <= 12, total
        assert total[16, k] <= 1.5 * total[1, k], total
    # The loop itself: the same ops per extra pick whatever the batch size.
    assert total[1, 64] - total[1, 16] == total[16, 64] - total[16, 16], total


def test_triton_backend_ops_per_call_grow_with_neither_k_nor_the_images():
    """At most 50 ops per call for any batch of up to 64 images, equal-sized or ragged: one
    kernel launch for every pick, one batched GEMM for every image's similarity."""
    with interpreted():
        counts = {(b, k): dispatches("triton", b, k) for b in (1, 8) for k in (16, 64)}
        counts[64, 16] = dispatches("triton", 64, 16)
        gen = torch.Generator().manual_seed(5)
        sizes = [200 + 7 * i for i in range(64)]  # every image its own size
        x = [torch.randn(n, 64, generator=gen) for n in sizes]
        s = [torch.rand(n, generator=gen) for n in sizes]
        ragged = count_dispatches(lambda: id_select_batched(x, s, [16] * 64, backend="triton"))
    total = {key: c.total() for key, c in counts.items()}
    assert total[1, 16] == total[1, 64] and total[8, 16] == total[8, 64], total
    assert total[8, 16] == total[64, 16] <= total[1, 16] + 2, total  # not one more per image
    assert max(total.values()) <= 50 and ragged.total() <= 50, (total, ragged)
    for c in (*counts.values(), ragged):
        assert c["idselect::triton_greedy_kernel"] == 1 and c["aten::bmm"] == 1, c
        assert c["aten::mm"] == 0, c
