"""How close `captioner caption-folder` comes to the library's batched throughput.

    python benchmarks/bench_folder.py [--images 256] [--data DIR] [--checkpoint PATH]
                                      [--batch-size 32] [--workers 2] [--num-beams 3]
                                      [--upscale LONG_SIDE]

1. Makes a temporary folder of N JPEGs: by default the Flickr8k photos listed in
   ../shared/data/flickr8k/original_aspect.txt, cycled; `--data` takes every image of another
   folder instead; `--upscale 4032` re-encodes 32 of them at that long side (phone-photo size), where
   reduced-size JPEG decoding matters most.
2. Library: decodes every image up front (timed: decode ms per image, one thread), then times
   `Captioner.caption_pixels` on batches of already-decoded tensors (after one warm-up batch).
   Measured before and after the folder run, and averaged, since the machine may be shared.
3. Folder: runs the real command in a subprocess and reads its own throughput (captioning time,
   model loading excluded) from its summary; the whole command's wall time is shown too.

The model is the bundled default (captioner/weights/default.pt); while it does not exist, a
checkpoint of the same architecture (training/configs/flickr8k.yaml decoder, 2,600 words) with a
random decoder is built: it runs at the same speed. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from stand_in import default_size_checkpoint  # noqa: E402
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
DEFAULT_CHECKPOINT = ROOT / "captioner" / "weights" / "default.pt"


def make_folder(folder: Path, count: int, data: Path | None, upscale: int | None) -> list[Path]:
    if data is None:
        names = (FLICKR / "original_aspect.txt").read_text().split()
        sources = [FLICKR / "images" / n for n in names]
    else:
        sources = sorted(p for p in data.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not sources:
        raise SystemExit(f"no images in {data or FLICKR}")
    if upscale:
        sources = sources[:32]  # re-encoding is slow: cycle 32 large photos
    folder.mkdir(parents=True)
    made = []
    for i in range(count):
        source = sources[i % len(sources)]
        target = folder / f"{i:06d}_{source.name}"
        if upscale and i < len(sources):
            with Image.open(source) as image:
                scale = upscale / max(image.size)
                image = image.convert("RGB").resize((round(image.width * scale), round(image.height * scale)),
                                                    Image.Resampling.BICUBIC)
                target = target.with_suffix(".jpg")
                image.save(target, quality=90)
        elif upscale:
            shutil.copyfile(made[i % len(sources)], target.with_suffix(".jpg"))
            target = target.with_suffix(".jpg")
        else:
            shutil.copyfile(source, target)
        made.append(target)
    return made


def library_throughput(model, pixels: torch.Tensor, batch_size: int, config) -> float:
    model.caption_pixels(pixels[:batch_size], config)  # warm-up (oneDNN picks its kernels)
    start = time.perf_counter()
    for first in range(0, len(pixels), batch_size):
        model.caption_pixels(pixels[first:first + batch_size], config)
    return len(pixels) / (time.perf_counter() - start)


def folder_throughput(folder: Path, output: Path, checkpoint: Path, args, count: int) -> tuple[float, float]:
    """The command's own images/s (captioning only) and its whole wall time."""
    command = [sys.executable, "-m", "captioner.cli", "caption-folder", str(folder), "-o", str(output),
               "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--num-beams", str(args.num_beams)]
    start = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if finished.returncode != 0:
        raise SystemExit(f"caption-folder failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    summary = re.search(r"captioned (\d+), failed (\d+).*?; ([\d.]+) s, ([\d.]+) images/s", finished.stderr)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    if summary is None or int(summary.group(1)) != count or len(records) != count:
        raise SystemExit(f"caption-folder did not caption every image:\n{finished.stderr[-3000:]}")
    return float(summary.group(4)), wall


def _list(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--data", type=Path, default=None, help="another folder of images to cycle")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--upscale", type=int, default=None, metavar="LONG_SIDE")
    parser.add_argument("--rounds", type=int, default=2, help="folder runs, each followed by a library run")
    args = parser.parse_args()

    from captioner.api import Captioner
    from captioner.decoding import DecodeConfig

    with tempfile.TemporaryDirectory(prefix="bench_folder_") as temporary:
        temporary = Path(temporary)
        checkpoint = args.checkpoint
        model_note = str(checkpoint)
        if checkpoint is None and DEFAULT_CHECKPOINT.is_file():
            checkpoint, model_note = DEFAULT_CHECKPOINT, "bundled default model"
        elif checkpoint is None:
            checkpoint = default_size_checkpoint(temporary / "default_size.pt")
            model_note = "default architecture, random decoder (bundled model not built yet)"
        paths = make_folder(temporary / "images", args.images, args.data, args.upscale)
        with Image.open(paths[0]) as first:
            image_size = f"{first.width}x{first.height}"

        model = Captioner.from_checkpoint(checkpoint)
        config = DecodeConfig(num_beams=args.num_beams)
        decode_ms = []
        for _ in range(2):  # the first pass also pays for imports and the page cache
            start = time.perf_counter()
            pixels = torch.stack([model.preprocessing.load(p) for p in paths])
            decode_ms.append((time.perf_counter() - start) / len(paths) * 1000)
        decode_ms = min(decode_ms)
        library_runs = [library_throughput(model, pixels, args.batch_size, config)]
        folder_runs, walls = [], []
        for round_ in range(args.rounds):  # interleaved: a shared machine's load drifts
            output = temporary / f"captions{round_}.jsonl"
            folder, wall = folder_throughput(temporary / "images", output, checkpoint, args, len(paths))
            folder_runs.append(folder)
            walls.append(wall)
            library_runs.append(library_throughput(model, pixels, args.batch_size, config))

    library, folder = statistics.median(library_runs), statistics.median(folder_runs)
    command_wall = statistics.median(walls)
    rows = [
        ("model", model_note),
        ("images", f"{len(paths)} JPEGs, first {image_size}"),
        ("settings", f"batch {args.batch_size}, {args.workers} workers, beam {args.num_beams}, "
                     f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs"),
        ("decode + resize, 1 process", f"{decode_ms:.1f} ms/image"),
        ("model on decoded tensors", f"{1000 / library:.1f} ms/image"),
        ("library (decoded tensors)", f"{library:.2f} images/s (median of {_list(library_runs)})"),
        ("caption-folder", f"{folder:.2f} images/s (median of {_list(folder_runs)}; "
                           f"{len(paths) / command_wall:.2f} counting start-up and model loading)"),
        ("folder / library", f"{folder / library:.3f} (target >= 0.8)"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print(json.dumps({
        "folder_images_per_s": round(folder, 3),
        "library_images_per_s": round(library, 3),
        "folder_over_library": round(folder / library, 3),
        "library_runs": [round(x, 3) for x in library_runs],
        "folder_runs": [round(x, 3) for x in folder_runs],
        "command_images_per_s_with_startup": round(len(paths) / command_wall, 3),
        "decode_ms_per_image": round(decode_ms, 2),
        "model_ms_per_image": round(1000 / library, 2),
        "images": len(paths), "image_size": image_size, "batch_size": args.batch_size,
        "workers": args.workers, "num_beams": args.num_beams, "model": model_note,
    }))


if __name__ == "__main__":
    main()
