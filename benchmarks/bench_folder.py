"""How close `captioner caption-folder` comes to the library's batched throughput.

    python benchmarks/bench_folder.py [--images 1024] [--data DIR] [--checkpoint PATH]
                                      [--batch-size 32] [--workers 2] [--num-beams 3]
                                      [--upscale LONG_SIDE] [--engine ray] [--precision auto]

1. Makes a temporary folder of N JPEGs: by default the Flickr8k photos listed in
   ../shared/data/flickr8k/original_aspect.txt, cycled; `--data` takes every image of another
   folder instead; `--upscale 4032` re-encodes 32 of them at that long side (phone-photo size), where
   reduced-size JPEG decoding matters most.
2. Library: decodes every image up front (timed: decode ms per image, one thread), then times
   `Captioner.caption_pixels` on batches of already-decoded tensors (after one warm-up batch).
   Measured before and after the folder run, and averaged, since the machine may be shared.
3. Folder: runs the real command in a subprocess and reads its own throughput (captioning time,
   model loading excluded) from its summary; the whole command's wall time is shown too.
4. `--engine ray`: each round also runs the command with `--engine ray` on the same photos (a Ray
   started by the command on this machine: one actor with all the cores, decoding in Ray tasks;
   its throughput counts from the moment the first actor starts a batch, as the local engine's
   counts from when its model is loaded) and reports Ray's images/s against the local engine's
   (`ray_over_local`, and the ratio within each round, since a shared machine's load drifts).

1,024 photos by default: a short run measures the start more than the steady state (the local
engine's first batches wait for its decoding workers; Ray's actor loads its model while decoding
runs a few batches ahead). The local engine measured 0.56x the library with 256 photos (176-211
images/s) and 0.64-0.77x with 1,024 and 2,048 (186-252), alternating in runs of their own
(docs/benchmarks.md, Caption-folder).

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


def folder_throughput(folder: Path, output: Path, checkpoint: Path, args, count: int,
                      engine: str = "local") -> tuple[float, float]:
    """The command's own images/s (captioning only) and its whole wall time."""
    command = [sys.executable, "-m", "captioner.cli", "caption-folder", str(folder), "-o", str(output),
               "--checkpoint", str(checkpoint), "--batch-size", str(args.batch_size),
               "--workers", str(args.workers), "--num-beams", str(args.num_beams), "--engine", engine,
               "--precision", args.precision]
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
    from captioner.runtime.cpu import keep_freed_memory

    keep_freed_memory()  # the library here under the allocator settings the CLI uses
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1024, help="photos (default: 1024)")
    parser.add_argument("--data", type=Path, default=None, help="another folder of images to cycle")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--upscale", type=int, default=None, metavar="LONG_SIDE")
    parser.add_argument("--precision", default="auto", help="inference path of both sides (default: auto)")
    parser.add_argument("--rounds", type=int, default=2, help="folder runs, each followed by a library run")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="ray: also run the Ray engine on the same photos and compare it with the local one")
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

        model = Captioner.from_checkpoint(checkpoint, precision=args.precision)
        config = DecodeConfig(num_beams=args.num_beams)
        decode_ms = []
        for _ in range(2):  # the first pass also pays for imports and the page cache
            start = time.perf_counter()
            pixels = torch.stack([model.preprocessing.load(p) for p in paths])
            decode_ms.append((time.perf_counter() - start) / len(paths) * 1000)
        decode_ms = min(decode_ms)
        library_runs = [library_throughput(model, pixels, args.batch_size, config)]
        folder_runs, walls, ray_runs, ray_walls = [], [], [], []
        for round_ in range(args.rounds):  # interleaved: a shared machine's load drifts
            output = temporary / f"captions{round_}.jsonl"
            folder, wall = folder_throughput(temporary / "images", output, checkpoint, args, len(paths))
            folder_runs.append(folder)
            walls.append(wall)
            if args.engine == "ray":
                output = temporary / f"ray{round_}.jsonl"
                ray, wall = folder_throughput(temporary / "images", output, checkpoint, args, len(paths), "ray")
                ray_runs.append(ray)
                ray_walls.append(wall)
            library_runs.append(library_throughput(model, pixels, args.batch_size, config))

    library, folder = statistics.median(library_runs), statistics.median(folder_runs)
    command_wall = statistics.median(walls)
    from captioner.runtime.cpu import cpu_flags, cpu_name

    rows = [
        ("cpu", f"{cpu_name()}, {'AVX-512 BF16' if 'avx512_bf16' in cpu_flags() else 'AVX2'}"),
        ("model", f"{model_note}; {model.inference.precision} on {model.inference.runtime} "
                  f"(asked: {args.precision})"),
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
    extra = {}
    if ray_runs:
        ray = statistics.median(ray_runs)
        rows += [
            ("caption-folder --engine ray", f"{ray:.2f} images/s (median of {_list(ray_runs)}; "
                                            f"{len(paths) / statistics.median(ray_walls):.2f} counting start-up)"),
            ("ray / local engine", f"{ray / folder:.3f} (target >= 0.85; per round "
                                   f"{_list([r / f for r, f in zip(ray_runs, folder_runs)])})"),
        ]
        extra = {"local_images_per_s": round(folder, 3), "ray_images_per_s": round(ray, 3),
                 "ray_over_local": round(ray / folder, 3), "ray_runs": [round(x, 3) for x in ray_runs],
                 "ray_over_local_per_round": [round(r / f, 3) for r, f in zip(ray_runs, folder_runs)],
                 "ray_images_per_s_with_startup": round(len(paths) / statistics.median(ray_walls), 3)}
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
        "precision": model.inference.precision, "runtime": model.inference.runtime, **extra,
    }))


if __name__ == "__main__":
    main()
