"""Inference speed: encoder alone against encoder + decoding, per image, on this machine.

    python benchmarks/bench_inference.py [--checkpoint PATH] [--images DIR] [--repeats 5] [--device cuda]

Times `Captioner.encode` (the encoder alone) and `Captioner.caption_pixels` (encoder + greedy or
beam-3 decoding with the library defaults, which for a model with a tagger include its guidance,
and beam 3 without tags) on the same preprocessed photos, at batch 1 and batch 16, interleaved and
repeated, and reports medians in milliseconds per image and the ratios end-to-end / encoder.
JPEG decoding is excluded from both (see bench_folder.py for that). The last line is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.api import DEFAULT_CHECKPOINT, Captioner  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402


def load_photos(folder: Path | None, count: int, model: Captioner) -> torch.Tensor:
    """(count, 3, S, S) uint8: real photos when a folder is given, else the bundled examples."""
    paths = sorted(folder.glob("*.jpg"))[:count] if folder else sorted((ROOT / "examples").glob("*.jpg"))
    if not paths:
        raise SystemExit(f"no .jpg photos in {folder}")
    pixels = [model.load_pixels(p) for p in paths]
    return torch.stack([pixels[i % len(pixels)] for i in range(count)])


def time_per_image(function, pixels: torch.Tensor, batch: int) -> float:
    """Milliseconds per image for one pass over `pixels` in batches of `batch`."""
    started = time.perf_counter()
    for start in range(0, len(pixels), batch):
        function(pixels[start:start + batch])
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # the encoder's output may still be computing
    return (time.perf_counter() - started) * 1000 / len(pixels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--images", type=Path, default=None, help="folder of .jpg photos (default: examples/)")
    parser.add_argument("--count", type=int, default=32, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = Captioner.from_checkpoint(args.checkpoint, device=args.device)
    pixels = load_photos(args.images, args.count, model)
    greedy, beam3, plain = DecodeConfig(num_beams=1), DecodeConfig(num_beams=3), DecodeConfig(num_beams=3, tags=False)
    cases = {
        "encoder": lambda x: model.encode(x),
        "greedy": lambda x: model.caption_pixels(x, greedy),
        "beam3": lambda x: model.caption_pixels(x, beam3),
        "beam3_no_tags": lambda x: model.caption_pixels(x, plain),
    }
    for batch in (1, 16):  # warm-up: allocator, oneDNN kernels, the decoder's word table
        for function in cases.values():
            time_per_image(function, pixels[:batch], batch)
    samples: dict[tuple[str, int], list[float]] = {(n, b): [] for n in cases for b in (1, 16)}
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit all cases alike
        for batch in (1, 16):
            for name, function in cases.items():
                samples[(name, batch)].append(time_per_image(function, pixels, batch))
    ms = {key: statistics.median(values) for key, values in samples.items()}
    lengths = [len(r.sequences[0].words) for r in model.caption_pixels(pixels, beam3)]

    print(f"checkpoint: {args.checkpoint}  device: {model.device}  threads: {torch.get_num_threads()}  "
          f"images: {len(pixels)}  mean beam-3 caption length: {statistics.mean(lengths):.1f} words")
    print(f"{'':15}{'ms/image b1':>14}{'ms/image b16':>14}{'ratio b1':>10}{'ratio b16':>11}")
    for name in cases:
        print(f"{name:15}{ms[(name, 1)]:>14.2f}{ms[(name, 16)]:>14.2f}"
              f"{ms[(name, 1)] / ms[('encoder', 1)]:>10.2f}{ms[(name, 16)] / ms[('encoder', 16)]:>11.2f}")
    figures = {
        "encoder_ms_b1": round(ms[("encoder", 1)], 2),
        "encoder_ms_b16": round(ms[("encoder", 16)], 2),
        "greedy_ms_b1": round(ms[("greedy", 1)], 2),
        "greedy_ms_b16": round(ms[("greedy", 16)], 2),
        "beam3_ms_b1": round(ms[("beam3", 1)], 2),
        "beam3_ms_b16": round(ms[("beam3", 16)], 2),
        "greedy_b1_over_encoder": round(ms[("greedy", 1)] / ms[("encoder", 1)], 3),
        "greedy_b16_over_encoder": round(ms[("greedy", 16)] / ms[("encoder", 16)], 3),
        "beam3_b1_over_encoder": round(ms[("beam3", 1)] / ms[("encoder", 1)], 3),
        "beam3_b16_over_encoder": round(ms[("beam3", 16)] / ms[("encoder", 16)], 3),
        "beam3_no_tags_b1_over_encoder": round(ms[("beam3_no_tags", 1)] / ms[("encoder", 1)], 3),
        "beam3_no_tags_b16_over_encoder": round(ms[("beam3_no_tags", 16)] / ms[("encoder", 16)], 3),
        "tagged_share": round(sum(bool(r.required or r.excluded) for r in model.caption_pixels(pixels, beam3))
                              / len(pixels), 3),
        "device": str(model.device),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
