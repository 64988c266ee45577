"""Inference speed: encoder alone against encoder + decoding, per image, and the inference paths
(fp32 eager, bf16, int8, ONNX Runtime) end to end, on this machine.

    python benchmarks/bench_inference.py [--checkpoint PATH] [--images DIR] [--repeats 5] [--device cuda]
                                         [--onnx OUT.onnx] [--paths fp32,bf16,int8,onnx,onnx_int8]

Times `Captioner.encode` (the encoder alone) and `Captioner.caption_pixels` (encoder + greedy or
beam-3 decoding with the library defaults, which for a model with a tagger include its guidance,
and beam 3 without tags) on the same preprocessed photos, at batch 1 and batch 16, interleaved and
repeated, and reports medians in milliseconds per image and the ratios end-to-end / encoder, all
on fp32 eager PyTorch. Then the inference paths (`captioner/runtime/precision.py`): fp32 eager,
bf16 (the encoder under autocast), int8 (the .pt checkpoint's encoder quantised, on ONNX Runtime),
onnx (an ONNX export: encoder and the decoder's step on ONNX Runtime; `--onnx`, else exported into
a temporary folder first) and onnx_int8 (that export with its int8 encoder): for each, the
encoder alone and beam 3 with and without tags at batch 1 and 16, the ratios to the same path's
encoder and the decoder's share of a caption's time, end-to-end images/s as ratios to fp32 eager,
and the share of photos whose top caption equals fp32's; with the CPU's capabilities and the path
`auto` picks, whose figures are repeated as `auto_*`. Photos: `--images`, else the Flickr8k
photos in ../shared/data when present (real photos: the "same top caption" share means little on
the three bundled examples), else examples/. JPEG decoding is excluded throughout (see
bench_folder.py for that). The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.api import DEFAULT_CHECKPOINT, Captioner  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402
from captioner.runtime import cpu  # noqa: E402

PATHS = ("fp32", "bf16", "int8", "onnx", "onnx_int8")


FLICKR8K = ROOT.parent / "shared" / "data" / "flickr8k" / "images"


def load_photos(folder: Path | None, count: int, model: Captioner) -> torch.Tensor:
    """(count, 3, S, S) uint8: the folder's first `count` photos (cycled if fewer)."""
    if folder is None:
        folder = FLICKR8K if FLICKR8K.is_dir() else ROOT / "examples"
    print(f"photos: {folder}")
    paths = sorted(folder.glob("*.jpg"))[:count]
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
    cpu.keep_freed_memory()  # the library here under the allocator settings the CLI uses
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--images", type=Path, default=None,
                        help="folder of .jpg photos (default: ../shared/data/flickr8k/images if present, else examples/)")
    parser.add_argument("--count", type=int, default=32, help="images per timed pass")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--onnx", type=Path, default=None, help="an ONNX export of the checkpoint (default: export one)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"inference paths to time, of {', '.join(PATHS)}")
    args = parser.parse_args()
    unknown = set(args.paths.split(",")) - set(PATHS) - {""}
    if unknown:
        parser.error(f"unknown paths {', '.join(sorted(unknown))}: the paths are {', '.join(PATHS)}")
    if args.threads:
        torch.set_num_threads(args.threads)  # before loading: ONNX Runtime sessions take this thread count
    model = Captioner.from_checkpoint(args.checkpoint, device=args.device, precision="fp32")
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
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as folder:
        figures.update(time_paths(args, model, pixels, beam3, Path(folder)))
    print(json.dumps(figures))


def load_paths(args, reference: Captioner, folder: Path) -> tuple[dict[str, Captioner], dict[str, str]]:
    """The paths to time, and why any asked for is left out."""
    wanted = [p for p in args.paths.split(",") if p]
    models, skipped = {"fp32": reference}, {}
    onnx_file = args.onnx
    for name in wanted:
        if name == "fp32":
            continue
        try:
            if name in ("bf16", "int8"):
                models[name] = Captioner.from_checkpoint(args.checkpoint, device=args.device, precision=name)
                continue
            if onnx_file is None:
                from captioner.runtime.onnx_export import export

                onnx_file = folder / "model.onnx"
                export(reference, onnx_file)
            models[name] = Captioner.from_checkpoint(onnx_file, precision="int8" if name == "onnx_int8" else "fp32")
        except (ValueError, RuntimeError) as error:  # no extra, no calibration, not on this device
            skipped[name] = str(error)
    return models, skipped


CASES = ("encoder", "beam3", "beam3_no_tags")


def time_paths(args, reference: Captioner, pixels: torch.Tensor, config: DecodeConfig, folder: Path) -> dict:
    """Every path: the encoder alone and beam 3 with and without tags, at batch 1 and 16,
    interleaved and repeated."""
    models, skipped = load_paths(args, reference, folder)
    plain = dataclasses.replace(config, tags=False)
    cases = {(name, case): fn for name, model in models.items() for case, fn in (
        ("encoder", lambda x, m=model: m.encode(x)),
        ("beam3", lambda x, m=model: m.caption_pixels(x, config)),
        ("beam3_no_tags", lambda x, m=model: m.caption_pixels(x, plain)))}
    for batch in (1, 16):  # warm-up
        for function in cases.values():
            time_per_image(function, pixels[:batch], batch)
    samples = {(key, b): [] for key in cases for b in (1, 16)}
    for _ in range(args.repeats):
        for batch in (1, 16):
            for key, function in cases.items():
                samples[(key, batch)].append(time_per_image(function, pixels, batch))
    ms = {key: statistics.median(values) for key, values in samples.items()}
    reference_top = [r.text for r in reference.caption_pixels(pixels, config)]
    capabilities = cpu.capabilities()
    auto = Captioner.from_checkpoint(args.checkpoint, device=args.device).inference
    auto_name = {"onnxruntime": "int8" if auto.precision == "int8" else "onnx"}.get(auto.runtime, auto.precision)
    print(f"\nCPU: {capabilities['name']}; PyTorch {capabilities['torch_capability']}; "
          f"{', '.join(capabilities['flags']) or 'no AVX2/AVX-512/AMX flags'}; threads {torch.get_num_threads()}")
    print(f"auto picks {auto.precision} on {auto.runtime} (path {auto_name}): {auto.reason}")
    print("ms per image; x enc: over the same path's encoder; decoder: its share of a guided caption's time")
    print(f"{'path':11}{'b':>3}{'encoder':>9}{'beam3':>8}{'x enc':>7}{'no tags':>9}{'x enc':>7}{'decoder':>9}"
          f"{'x fp32':>8}{'same top caption':>18}")
    figures: dict = {"cpu": capabilities, "auto_path": auto.precision, "auto_runtime": auto.runtime}
    for name, model in models.items():
        same = sum(a == r.text for a, r in zip(reference_top, model.caption_pixels(pixels, config))) / len(pixels)
        figures[f"{name}_same_top_caption"] = round(same, 3)
        for batch in (1, 16):
            encoder, guided, unguided = (ms[((name, case), batch)] for case in CASES)
            speedup = ms[(("fp32", "beam3"), batch)] / guided
            share = (guided - encoder) / guided
            print(f"{name:11}{batch:>3}{encoder:>9.2f}{guided:>8.2f}{guided / encoder:>7.2f}{unguided:>9.2f}"
                  f"{unguided / encoder:>7.2f}{share:>9.0%}{speedup:>8.2f}{same:>18.0%}")
            b = f"b{batch}"
            figures.update({f"{name}_images_per_s_{b}": round(1000 / guided, 2),
                            f"{name}_over_fp32_{b}": round(speedup, 3),
                            f"{name}_encoder_ms_{b}": round(encoder, 2),
                            f"{name}_beam3_{b}_over_encoder": round(guided / encoder, 3),
                            f"{name}_beam3_no_tags_{b}_over_encoder": round(unguided / encoder, 3),
                            f"{name}_decoder_share_{b}": round(share, 3)})
    for name, why in skipped.items():
        print(f"{name:15}skipped: {why}")
    if auto_name in models:
        for b in ("b1", "b16"):
            figures[f"auto_beam3_{b}_over_encoder"] = figures[f"{auto_name}_beam3_{b}_over_encoder"]
            figures[f"auto_beam3_no_tags_{b}_over_encoder"] = figures[f"{auto_name}_beam3_no_tags_{b}_over_encoder"]
            figures[f"auto_decoder_share_{b}"] = figures[f"{auto_name}_decoder_share_{b}"]
    fastest = max(models, key=lambda n: figures[f"{n}_images_per_s_b16"])
    figures.update({"fastest_path": fastest,
                    "fastest_over_fp32_b16": figures[f"{fastest}_over_fp32_b16"],
                    "fastest_over_fp32_b1": figures[f"{fastest}_over_fp32_b1"],
                    "skipped_paths": skipped})
    return figures


if __name__ == "__main__":
    main()
