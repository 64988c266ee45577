"""Training throughput: from the feature cache against end to end (JPEG decoding + encoder every
step), with the project's own training loop, on the same images and captions.

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
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from training.config import load_config  # noqa: E402
from training.train import Context, Progress, train_one_epoch  # noqa: E402


def throughput(overrides: list[str], warmup_batches: int) -> tuple[float, float, float]:
    """(captions per second of one training epoch, seconds spent building the context, seconds of
    the warm-up batches)."""
    started = time.perf_counter()
    ctx = Context(load_config(ROOT / "training/configs/flickr8k.yaml", overrides), None)
    setup = time.perf_counter() - started
    started = time.perf_counter()
    train_one_epoch(ctx, Progress(batches_done=max(0, ctx.batches_per_epoch - warmup_batches)))
    _synchronize(ctx.device)
    warmup = time.perf_counter() - started
    progress = Progress(epoch=1)
    started = time.perf_counter()
    train_one_epoch(ctx, progress)
    _synchronize(ctx.device)
    elapsed = time.perf_counter() - started
    captions = progress.batches_done * ctx.cfg.optim.batch_images * ctx.cfg.data.captions_per_image
    return captions / elapsed, setup, warmup


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
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache_dir = args.cache_dir or tempfile.mkdtemp(prefix="bench_training_cache_")
    common = [f"--data.train.path={args.data}", f"--data.val.path={args.data}", f"--data.train.limit={args.images}",
              "--data.val.limit=8", f"--data.cache_dir={cache_dir}", f"--run.device={args.device}",
              "--run.progress=false", f"--run.compile={str(args.compile).lower()}",
              f"--run.out_dir={tempfile.mkdtemp(prefix='bench_training_run_')}"]
    cached, cache_build, warmup = throughput(common + ["--data.use_cache=true"], args.warmup_batches)
    uncached, _, _ = throughput(common + ["--data.use_cache=false"], args.warmup_batches)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    print(f"device: {device}  threads: {torch.get_num_threads()}  images: {args.images} "
          f"(32 images x 5 captions per step)")
    print(f"{'mode':28}{'captions/s':>12}")
    print(f"{'from the feature cache':28}{cached:>12.1f}")
    print(f"{'end to end (decode+encode)':28}{uncached:>12.1f}")
    print(f"cached / uncached: {cached / uncached:.1f}x   (building the cache took {cache_build:.1f} s, once; "
          f"the {args.warmup_batches} warm-up batches {warmup:.1f} s)")
    print(json.dumps({"cached_captions_per_s": round(cached, 1), "uncached_captions_per_s": round(uncached, 1),
                      "cached_over_uncached": round(cached / uncached, 2), "device": device,
                      "images": args.images, "compile": args.compile, "cache_build_s": round(cache_build, 1),
                      "cached_warmup_s": round(warmup, 1)}))


if __name__ == "__main__":
    main()
