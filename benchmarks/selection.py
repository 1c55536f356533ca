"""Is ID-Selection cheap next to the vision encoder it rides on, on CPU and on GPUs?

Run from the repository root (needs only torch, transformers and, for the Triton backend, triton;
no vLLM and no install of this project):

    python -m benchmarks.selection [--device cpu|cuda] [--quick] [--repeats R]
        [--tower-repeats R] [--threads T]

Three tables, all measured in the same run:
1. Dispatched ops per `id_select_batched` call, per backend, for B in {1, 8, 16} images x
   K in {16, 64, 192} (N = 576, D = 1024): the CPU-visible proxy for GPU kernel launches
   (benchmarks/dispatch_count.py); on CUDA also the kernels the GPU ran. On CPU the Triton kernel
   runs through Triton's interpreter, counted as its one launch.
2. (CPU) per-image selection time against a CLIP-ViT-L/14-336-shaped tower with random fp32
   weights: 576 tokens = one 336-px crop, 2880 = 5 crops (LLaVA-NeXT), 16384 = 29 crops
   (extrapolated from 5). Targets: <= 1% of the tower at N=576/K=64 and <= 2% at N=2880.
3. (CUDA; on CPU only with --quick, torch backend) each backend against the tower as LLaVA runs it
   (transformers `CLIPVisionModel`, random weights, bf16, 23 layers) for B in {1, 8} images,
   N in {576, 2880}, K in {16, 64, 192, 320}, timed with CUDA events, plus a check that both
   backends pick the same tokens on the device. Targets (H100/H200): Triton <= 2% of the tower at
   B=8/N=576/K=64 and <= 0.1 ms at B=1/N=576/K=64.

--quick is a smoke run (about a minute on CPU): small shapes, a 2-layer tower whose time is
scaled to the full depth; its ratios are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

WIDTH = 1024
TOKENS_PER_CROP = 576  # (336 / 14) ** 2
BACKENDS = ("torch", "triton")


@dataclass(frozen=True)
class Plan:
    """What one run measures; --quick shrinks every axis."""

    dispatch_batches: tuple[int, ...]
    dispatch_budgets: tuple[int, ...]
    dispatch_width: int
    cpu_tokens: tuple[int, ...]
    cpu_budgets: Callable[[int], list[int]]
    gpu_batches: tuple[int, ...]
    gpu_tokens: tuple[int, ...]
    gpu_budgets: tuple[int, ...]
    tower_layers: int
    corpus_cases: int


FULL = Plan(
    dispatch_batches=(1, 8, 16, 64),
    dispatch_budgets=(16, 64, 192),
    dispatch_width=WIDTH,
    cpu_tokens=(576, 2880, 16384),
    cpu_budgets=lambda n: [16, 64, 192, n // 10],
    gpu_batches=(1, 8),
    gpu_tokens=(576, 2880),
    gpu_budgets=(16, 64, 192, 320),
    tower_layers=0,  # 0: the real depth (24 for the CPU table, 23 for the GPU table)
    corpus_cases=200,
)
QUICK = Plan(
    dispatch_batches=(1, 8),
    dispatch_budgets=(16, 64),
    dispatch_width=64,
    cpu_tokens=(576, 2880),
    cpu_budgets=lambda n: [16, 64],
    gpu_batches=(1, 2),
    gpu_tokens=(576,),
    gpu_budgets=(16, 64),
    tower_layers=2,
    corpus_cases=20,
)


def elapsed_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median time of `fn` in ms after one warm-up call: CUDA events on CUDA (GPU time, no
    sync inside), wall time on CPU."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
    return statistics.median(samples)


class Tower:
    """A random-weight CLIP-ViT-L/14-336 tower; `ms(crops)` is its forward time for a batch."""

    def __init__(self, device: torch.device, dtype: torch.dtype, layers: int, full: int) -> None:
        from transformers import CLIPVisionConfig, CLIPVisionModel

        self.layers = layers or full
        self.scale = full / self.layers
        config = CLIPVisionConfig(
            hidden_size=WIDTH,
            intermediate_size=4096,
            num_hidden_layers=self.layers,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
        )
        torch.manual_seed(0)
        self.model = CLIPVisionModel(config).eval().to(device=device, dtype=dtype)
        self.device, self.dtype = device, dtype
        self.basis = f"{full} layers" + ("" if self.scale == 1 else f", est. from {self.layers}")

    def ms(self, crops: int, repeats: int) -> float:
        pixels = torch.randn(crops, 3, 336, 336, device=self.device, dtype=self.dtype)
        with torch.inference_mode():
            forward = lambda: self.model(pixel_values=pixels)  # noqa: E731
            return elapsed_ms(forward, repeats, self.device) * self.scale


def inputs(
    device: torch.device, images: int, n: int, dtype: torch.dtype = torch.float32, d: int = WIDTH
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(images * 7919 + n)
    features = torch.randn(images, n, d, generator=generator).to(device=device, dtype=dtype)
    return features, torch.rand(images, n, generator=generator).to(device)


def dispatch_table(device: torch.device, plan: Plan, backends: tuple[str, ...]) -> list[str]:
    from benchmarks.dispatch_count import count_cuda_kernels, count_dispatches
    from idselect.selection import id_select_batched

    lines = [
        "dispatched ops per id_select_batched call (N=576, D={}; per pick in brackets){}".format(
            plan.dispatch_width, "; CUDA kernels after the slash" if device.type == "cuda" else ""
        ),
        f"{'backend':<8}{'B':>4}" + "".join(f"{f'K={k}':>22}" for k in plan.dispatch_budgets),
    ]
    for backend in backends:
        for images in plan.dispatch_batches:
            cells = []
            x, s = inputs(device, images, 576, d=plan.dispatch_width)
            for k in plan.dispatch_budgets:
                call = lambda: id_select_batched(x, s, [k] * images, backend=backend)  # noqa: B023,E731
                ops = count_dispatches(call).total()
                text = f"{ops} ({ops / k:.1f})"
                if device.type == "cuda":
                    text += f" / {count_cuda_kernels(call)}"
                cells.append(f"{text:>22}")
            lines.append(f"{backend:<8}{images:>4}" + "".join(cells))
    return lines


def cpu_overhead_table(
    plan: Plan, repeats: int, tower_repeats: int
) -> tuple[list[str], int]:
    """Per-image selection (torch backend) against the fp32 tower's time for its crops."""
    from idselect.selection import id_select

    device = torch.device("cpu")
    tower = Tower(device, torch.float32, plan.tower_layers, 24)
    one = tower.ms(1, tower_repeats)
    five = 5 * one if plan is QUICK else tower.ms(5, tower_repeats)
    header = (
        f"{'N':>7}{'K':>7}{'select_ms':>12}{'tower_ms':>12}  {'tower basis':<34}"
        f"{'select/tower':>13}{'target':>8}  result"
    )
    lines, missed = [header, "-" * len(header)], 0
    for n in plan.cpu_tokens:
        crops = math.ceil(n / TOKENS_PER_CROP)
        enc = one if crops == 1 else five * crops / 5
        basis = f"{crops} crop(s), {tower.basis}" + ("" if crops <= 5 else ", extrap. from 5")
        x, s = inputs(device, 1, n)
        for k in plan.cpu_budgets(n):
            sel = elapsed_ms(lambda: id_select(x[0], s[0], k, backend="torch"), repeats, device)  # noqa: B023
            goal = 1.0 if (n, k) == (576, 64) else 2.0 if n == 2880 else None
            pct = 100 * sel / enc
            verdict = "-" if goal is None else "PASS" if pct <= goal else "MISS"
            missed += verdict == "MISS"
            lines.append(
                f"{n:>7}{k:>7}{sel:>12.2f}{enc:>12.1f}  {basis:<34}{pct:>12.3f}%"
                f"{'-' if goal is None else f'<={goal:g}%':>8}  {verdict}"
            )
    return lines, missed


def batch_table(
    device: torch.device, plan: Plan, backends: tuple[str, ...], repeats: int, tower_repeats: int
) -> tuple[list[str], int]:
    """Each backend on B images against the bf16 23-layer tower for those images' crops."""
    from idselect.selection import id_select_batched

    tower = Tower(device, torch.bfloat16, plan.tower_layers, 23)
    header = (
        f"{'B':>3}{'N':>6}{'K':>5}{'tower_ms':>10}"
        + "".join(f"{f'{b}_ms':>11}{f'{b}/tower':>13}" for b in backends)
        + f"{'same picks':>12}  targets"
    )
    lines, missed = [f"tower: {tower.basis}, bf16; features bf16, scores fp32", header], 0
    for images in plan.gpu_batches:
        for n in plan.gpu_tokens:
            enc = tower.ms(images * math.ceil(n / TOKENS_PER_CROP), tower_repeats)
            x, s = inputs(device, images, n, torch.bfloat16)
            for k in plan.gpu_budgets:
                row, picks, checks = f"{images:>3}{n:>6}{k:>5}{enc:>10.2f}", set(), []
                for backend in backends:
                    call = lambda: id_select_batched(x, s, [k] * images, backend=backend)  # noqa: B023,E731
                    ms = elapsed_ms(call, repeats, device)
                    picks.add(repr([t.tolist() for t in call()]))
                    row += f"{ms:>11.3f}{100 * ms / enc:>12.3f}%"
                    if backend == "triton":
                        checks = _triton_targets(images, n, k, ms, enc)
                missed += sum("MISS" in c for c in checks) + (len(picks) > 1)
                same = "yes" if len(picks) == 1 else "NO"
                lines.append(f"{row}{same:>12}  {' '.join(checks) or '-'}")
    return lines, missed


def _triton_targets(images: int, n: int, k: int, ms: float, enc: float) -> list[str]:
    out = []
    if (images, n, k) == (8, 576, 64):
        out.append(f"<=2% of tower: {'PASS' if ms <= 0.02 * enc else 'MISS'}")
    if (images, n, k) == (1, 576, 64):
        out.append(f"<=0.1 ms: {'PASS' if ms <= 0.1 else 'MISS'}")
    return out


def corpus_check(device: torch.device, cases: int) -> tuple[str, int]:
    """Both backends on the device over the random corpus (ties, duplicates, ragged, fp16)."""
    from benchmarks.selection_corpus import corpus
    from idselect.selection import id_select_batched

    differ = []
    for case, batch, mode in corpus(cases):
        xs = [x.to(device) for x, _, _ in batch]
        ss = [s.to(device) for _, s, _ in batch]
        ks = [k for _, _, k in batch]
        picks = {
            repr([t.tolist() for t in id_select_batched(xs, ss, ks, suppression=mode, backend=b)])
            for b in BACKENDS
        }
        if len(picks) > 1:
            differ.append(case)
    return f"corpus on {device.type}: {cases - len(differ)}/{cases} cases pick identically" + (
        f" (differ: {differ[:10]})" if differ else ""
    ), len(differ)


def describe_machine(device: torch.device) -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    lines = [
        f"machine: {cpu}; cpu_count={os.cpu_count()}; torch threads={torch.get_num_threads()}; "
        f"torch {torch.__version__}; python {platform.python_version()}",
    ]
    if device.type == "cuda":
        import triton

        lines.append(
            f"cuda: {torch.cuda.get_device_name(device)}; triton {triton.__version__}; fp32 "
            f"matmul TF32 {'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'}"
        )
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        lines.append("load average at start: {:.2f} {:.2f} {:.2f}".format(*load))
        if device.type == "cpu" and load[0] > 0.5 * (os.cpu_count() or 1):
            lines.append(
                "WARNING: the machine is busy; small-op loops (selection) suffer from CPU "
                "contention far more than large GEMMs (encoder), so ratios are pessimistic"
            )
    return lines


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    plan = QUICK if args.quick else FULL
    repeats = 1 if args.quick else args.repeats
    tower_repeats = 1 if args.quick else args.tower_repeats
    from idselect.selection import resolve_backend

    try:
        resolve_backend("triton", device)
        backends = BACKENDS
    except ValueError as err:
        print(f"triton backend unavailable here ({err}); torch only")
        backends = ("torch",)
    for line in describe_machine(device):
        print(line)
    if args.quick:
        print("QUICK smoke run: small shapes; tower times are estimates, not measurements")
    missed = 0
    print()
    for line in dispatch_table(device, plan, backends):
        print(line)
    if device.type == "cpu":
        print("\nper-image selection (torch backend) vs the fp32 tower, CPU")
        lines, miss = cpu_overhead_table(plan, repeats, tower_repeats)
        missed += miss
        for line in lines:
            print(line)
    if device.type == "cuda" or args.quick:
        timed = backends if device.type == "cuda" else ("torch",)  # interpreted Triton: untimed
        print(f"\nbatched selection vs the bf16 tower, {device.type}")
        lines, miss = batch_table(device, plan, timed, repeats, tower_repeats)
        missed += miss
        for line in lines:
            print(line)
    if len(backends) == 2:
        line, miss = corpus_check(device, plan.corpus_cases)
        missed += miss
        print(f"\n{line}")
    if hasattr(os, "getloadavg"):
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"targets missed: {missed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5, help="selection timing repeats (median)")
    parser.add_argument("--tower-repeats", type=int, default=3, help="tower timing repeats")
    parser.add_argument("--quick", action="store_true", help="smoke run, about a minute on CPU")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.tower_repeats < 1 or args.threads < 0:
        parser.error("repeats must be >= 1 and threads >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    if args.device == "cpu":
        # The Triton kernel can only run on CPU tensors through Triton's interpreter, which must
        # be on before anything (transformers included) imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
