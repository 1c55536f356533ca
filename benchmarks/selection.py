"""Is ID-Selection cheap next to the vision encoder it rides on?

Times `id_select` per image (median of --repeats after one warm-up) for N in {576, 2880, 16384}
tokens of width 1024, fp32, on CPU (and CUDA when present), and in the same run the forward pass of
a CLIP-ViT-L/14-336-shaped vision tower with random weights. Selection is reported as a share of
that encoder time, against the targets: <= 1% at N=576, K=64 and <= 2% at N=2880 (every K).

Encoder basis per N: 576 tokens = one 336px crop (batch 1, measured); 2880 = 5 crops (LLaVA-NeXT
style, batch 5, measured); 16384 = ceil(16384/576) = 29 crops, extrapolated linearly from the
measured batch-5 time (a batch of 29 full-size crops is too slow to time repeatedly on a CPU).

    python benchmarks/selection.py [--repeats R] [--encoder-repeats R] [--threads T] [--quick]

--quick is a smoke run (well under a minute): N in {576, 2880}, K in {16, 64}, one repeat, and a
2-layer tower whose time is scaled to 24 layers; its ratios are estimates, not measurements.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from idselect.selection import id_select  # noqa: E402

WIDTH = 1024
LAYERS = 24
TOKENS_PER_CROP = 576  # (336 / 14) ** 2
FULL_N = (576, 2880, 16384)
QUICK_N = (576, 2880)
QUICK_K = (16, 64)
QUICK_LAYERS = 2
HEADER = (
    f"{'device':<7}{'N':>7}{'K':>7}{'select_ms':>12}{'encoder_ms':>13}  "
    f"{'encoder basis':<30}{'select/enc':>11}{'target':>8}  result"
)


def target_pct(n: int, k: int) -> float | None:
    """The budgets this benchmark checks: 1% at (576, 64), 2% for every K at 2880."""
    if n == 576 and k == 64:
        return 1.0
    if n == 2880:
        return 2.0
    return None


def budgets(n: int, quick: bool) -> list[int]:
    return list(QUICK_K) if quick else [16, 64, 192, n // 10]


def median_ms(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms after one warm-up call, synchronising CUDA around it."""

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - start) * 1e3

    timed()
    return statistics.median(timed() for _ in range(repeats))


@dataclass(frozen=True)
class EncoderTime:
    ms: float
    basis: str


def encoder_times(
    device: torch.device, ns: tuple[int, ...], repeats: int, quick: bool
) -> dict[int, EncoderTime]:
    """Forward time of a random-weight CLIP-ViT-L/14-336 tower for the crops behind each N."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    layers = QUICK_LAYERS if quick else LAYERS
    config = CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=4096,
        num_hidden_layers=layers,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
    )
    torch.manual_seed(0)
    tower = CLIPVisionModel(config).eval().to(device)
    scale = LAYERS / layers

    def forward_ms(batch: int) -> float:
        pixels = torch.randn(batch, 3, 336, 336, device=device)
        with torch.inference_mode():
            return median_ms(lambda: tower(pixel_values=pixels), repeats, device) * scale

    est = f", est. from {layers} layers" if quick else ""
    one = forward_ms(1)
    out = {576: EncoderTime(one, f"1 crop, batch 1{est}")}
    if any(n > TOKENS_PER_CROP for n in ns):
        if quick:
            five = EncoderTime(5 * one, f"5 x batch-1 time{est}")
        else:
            five = EncoderTime(forward_ms(5), "5 crops, batch 5")
        for n in ns:
            crops = math.ceil(n / TOKENS_PER_CROP)
            if crops == 5:
                out[n] = five
            elif crops > 1:
                out[n] = EncoderTime(five.ms * crops / 5, f"{crops} crops, extrap. from b=5{est}")
    return out


def selection_ms(device: torch.device, n: int, k: int, repeats: int) -> float:
    generator = torch.Generator().manual_seed(n * 7919 + k)
    features = torch.randn(n, WIDTH, generator=generator).to(device)
    scores = torch.rand(n, generator=generator).to(device)
    return median_ms(lambda: id_select(features, scores, k), repeats, device)


def gram_ms(device: torch.device, n: int, repeats: int) -> float:
    """The N x N similarity alone: a lower bound for a 'precompute everything' variant."""
    features = torch.nn.functional.normalize(torch.randn(n, WIDTH), dim=-1).to(device)
    return median_ms(lambda: features @ features.T, repeats, device)


def describe_machine() -> list[str]:
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
    if torch.cuda.is_available():
        lines.append(
            f"cuda: {torch.cuda.get_device_name(0)} (fp32, TF32 matmul "
            f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'})"
        )
    else:
        lines.append("cuda: not available (CPU only)")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()
        lines.append("load average at start: {:.2f} {:.2f} {:.2f}".format(*load))
        if load[0] > 0.5 * (os.cpu_count() or 1):
            lines.append(
                "WARNING: the machine is busy; small-op loops (selection) suffer from CPU "
                "contention far more than large GEMMs (encoder), so ratios are pessimistic"
            )
    return lines


def run(args: argparse.Namespace) -> int:
    ns = QUICK_N if args.quick else FULL_N
    repeats = 1 if args.quick else args.repeats
    encoder_repeats = 1 if args.quick else args.encoder_repeats
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))

    for line in describe_machine():
        print(line)
    print(
        f"features: N x {WIDTH} fp32 random; scores uniform; selection repeats={repeats}, "
        f"encoder repeats={encoder_repeats} (median after 1 warm-up)"
    )
    if args.quick:
        print("QUICK smoke run: encoder times are estimates, not measurements")
    print()
    print(HEADER)
    print("-" * len(HEADER))

    missed = 0
    notes = []
    for device in devices:
        encoder = encoder_times(device, ns, encoder_repeats, args.quick)
        for n in ns:
            for k in budgets(n, args.quick):
                sel = selection_ms(device, n, k, repeats)
                enc = encoder[n]
                pct = 100.0 * sel / enc.ms
                goal = target_pct(n, k)
                verdict = "-" if goal is None else ("PASS" if pct <= goal else "MISS")
                missed += verdict == "MISS"
                goal_text = "-" if goal is None else f"<={goal:g}%"
                print(
                    f"{device.type:<7}{n:>7}{k:>7}{sel:>12.2f}{enc.ms:>13.1f}  "
                    f"{enc.basis:<30}{pct:>10.3f}%{goal_text:>8}  {verdict}"
                )
            if n <= 4096:
                gram = gram_ms(device, n, repeats)
                notes.append(f"{device.type} N={n}: N x N similarity alone {gram:.2f} ms")
    print()
    print("precompute check (why selection computes one similarity row per pick):")
    for note in notes:
        print(f"  {note}")
    if hasattr(os, "getloadavg"):
        print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"targets missed: {missed}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="selection timing repeats")
    parser.add_argument("--encoder-repeats", type=int, default=3, help="encoder timing repeats")
    parser.add_argument("--quick", action="store_true", help="smoke run, well under a minute")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads for both parts (0: default)"
    )
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.encoder_repeats < 1 or args.threads < 0:
        parser.error("repeats must be >= 1 and threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
