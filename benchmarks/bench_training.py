"""Training throughput against the hardware: captions/s from the feature cache, the matrix FLOPs of
one cached step (counted by `torch.utils.flop_counter`) per second, against the machine's fp32
matrix peak (a large `torch.mm`, timed in the same run with the same threads right before each
of --rounds timed epochs, since a shared machine's speed drifts; medians over the rounds), and end to end
(JPEG decoding + encoder every step), with the project's own training loop on the same images.

    python benchmarks/bench_training.py [--data ../shared/data/flickr8k] [--images 320] [--device cuda]

Both runs take the same batches (32 images x 5 captions) through `train_one_epoch`; the cache is
built before timing (its one-time cost is printed too), and the last --warmup-batches of an
untimed first epoch go before the timed one (allocator, kernel choice, torch.compile if asked).
On a GPU (`--device cuda [--compile]`) the same script measures there. The last line is one
JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.train import Context, Progress, train_one_epoch  # noqa: E402


def matrix_peak(device: torch.device, dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` (size x size) @ (size x size) products."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first is a warm-up
        _synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size ** 3 / best / 1e9


def step_flops(ctx: Context) -> int:
    """Matrix FLOPs (forward and backward) of one cached training step of the run's recipe."""
    from torch.utils.flop_counter import FlopCounterMode

    from training.train import _cross_entropy_loss

    generator = torch.Generator().manual_seed(0)
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = _cross_entropy_loss(ctx, list(range(ctx.cfg.optim.batch_images)), generator, 0.0)
        loss.backward()
    ctx.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def throughput(overrides: list[str], warmup_batches: int, rounds: int = 1,
               between: Callable[[Context], object] | None = None) -> tuple[list[float], float, float, Context, list]:
    """(captions per second of each of `rounds` timed training epochs, seconds spent building the
    context, seconds of the warm-up batches, the run's context, what `between(ctx)` returned before
    each timed epoch)."""
    started = time.perf_counter()
    ctx = Context(load_config(ROOT / "training/configs/flickr8k.yaml", overrides), None)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    train_one_epoch(ctx, Progress(batches_done=max(0, ctx.batches_per_epoch - warmup_batches)))
    _synchronize(ctx.device)
    warmup = time.perf_counter() - started
    speeds, measured = [], []
    for round_ in range(rounds):
        if between is not None:
            measured.append(between(ctx))
        progress = Progress(epoch=round_ + 1)
        started = time.perf_counter()
        train_one_epoch(ctx, progress)
        _synchronize(ctx.device)
        elapsed = time.perf_counter() - started
        captions = progress.batches_done * ctx.cfg.optim.batch_images * ctx.cfg.data.captions_per_image
        speeds.append(captions / elapsed)
    return speeds, setup, warmup, ctx, measured


def peak_dtype(device: torch.device) -> torch.dtype:
    """What the step computes in: bf16 on GPUs, where autocast runs it; fp32 on CPUs, whose peak
    the issue measures in fp32."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    parser.add_argument("--images", type=int, default=320, help="training images per timed epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    parser.add_argument("--warmup-batches", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="timed cached epochs, each after its own peak measurement")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench_training_cache_")
    common = [f"--data.train.path={args.data}", f"--data.val.path={args.data}", f"--data.train.limit={args.images}",
              "--data.val.limit=8", f"--data.cache_dir={cache_dir}", f"--run.device={args.device}",
              "--run.progress=false", f"--run.compile={str(args.compile).lower()}",
              f"--run.out_dir={tempfile.mkdtemp(prefix='bench_training_run_')}"]
    # The peak is measured right before each timed epoch: on a shared or throttled machine the
    # speed of the same product drifts by a fifth within minutes, so each epoch is compared with
    # the peak of its own moment, and the figures are medians over the rounds.
    speeds, cache_build, warmup, ctx, peaks = throughput(
        common + ["--data.use_cache=true"], args.warmup_batches, args.rounds,
        between=lambda ctx: matrix_peak(ctx.device, peak_dtype(ctx.device)))
    flops = step_flops(ctx)
    captions_per_step = ctx.cfg.optim.batch_images * ctx.cfg.data.captions_per_image
    round_gflops = [flops / 1e9 * speed / captions_per_step for speed in speeds]  # matrix GFLOP/s per epoch
    fractions = [g / p for g, p in zip(round_gflops, peaks)]
    cached, gflops, peak = (statistics.median(x) for x in (speeds, round_gflops, peaks))
    fraction = statistics.median(fractions)
    uncached = statistics.median(throughput(common + ["--data.use_cache=false"], args.warmup_batches)[0])
    device = ctx.device.type
    amp = "bf16 autocast" if ctx.amp else "fp32"
    print(f"device: {device}  threads: {torch.get_num_threads()}  images: {args.images} "
          f"({ctx.cfg.optim.batch_images} images x {ctx.cfg.data.captions_per_image} captions per step"
          f"{f' + {ctx.cfg.optim.text_batch} captions without photos' if ctx.text is not None else ''}; {amp})")
    if device == "cpu":
        from captioner.runtime.cpu import BF16_FLAGS, cpu_flags, cpu_name

        print(f"CPU: {cpu_name()}; bf16 instructions: {[f for f in BF16_FLAGS if f in cpu_flags()] or 'none'}")
    print(f"{'mode':28}{'captions/s':>12}")
    print(f"{'from the feature cache':28}{cached:>12.1f}")
    print(f"{'end to end (decode+encode)':28}{uncached:>12.1f}")
    print(f"cached / uncached: {cached / uncached:.1f}x   (building the cache took {cache_build:.1f} s, once; "
          f"the {args.warmup_batches} warm-up batches {warmup:.1f} s)")
    print(f"one cached step: {flops / 1e9:.1f} GFLOP of matrix products; {gflops:.1f} GFLOP/s against an "
          f"{'bf16' if peak_dtype(ctx.device) == torch.bfloat16 else 'fp32'} torch.mm peak of {peak:.1f} GFLOP/s "
          f"(2048 x 2048, same threads, best of 5 right before each timed epoch): {fraction:.1%} of peak "
          f"(median of {len(fractions)} epochs: {', '.join(f'{f:.1%}' for f in fractions)}; "
          f"peaks {', '.join(f'{p:.0f}' for p in peaks)})")
    figures = {"cached_captions_per_s": round(cached, 1), "uncached_captions_per_s": round(uncached, 1),
               "cached_over_uncached": round(cached / uncached, 2), "device": device,
               "images": args.images, "compile": args.compile, "cache_build_s": round(cache_build, 1),
               "cached_warmup_s": round(warmup, 1), "step_gflop": round(flops / 1e9, 2), "amp": ctx.amp}
    prefix = "gpu" if device == "cuda" else "cpu"
    figures.update({f"{prefix}_gflops_per_s": round(gflops, 1), f"{prefix}_peak_gflops_per_s": round(peak, 1),
                    f"{prefix}_fraction_of_peak": round(fraction, 3),
                    f"{prefix}_fraction_of_peak_per_epoch": [round(f, 3) for f in fractions],
                    "compile_elementwise": bool(ctx.cfg.run.compile_elementwise and device == "cpu")})
    if device == "cuda":
        figures["gpu_captions_per_s"] = round(cached, 1)
    print(json.dumps(figures))



if __name__ == "__main__":
    main()
