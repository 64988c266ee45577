"""Do the faster inference paths keep the captions? Each path captions the same photos end to end
(pixels -> encoder -> beam search, tags included: the library's defaults), and is scored against
the references and against fp32 eager PyTorch, the reference path.

    python -m training.evaluate_paths --data ../shared/data/flickr8k --split dev \
        [--checkpoint CKPT] [--onnx OUT.onnx] [--paths fp32,bf16,int8,onnx,onnx_int8] [--json OUT.json] \
        [--against EARLIER.json]

Per path: CIDEr-D with its 95% bootstrap interval over photos, the change against fp32 with a
paired interval (the same draws of photos for both), and the share of photos whose top caption is
word for word fp32's. Paths: `fp32`, `bf16`, `int8` load the .pt checkpoint with that precision;
`onnx` and `onnx_int8` load an ONNX export (`--onnx`, else one exported into a temporary folder)
with fp32 or int8. JPEGs are decoded once and shared by all paths. `--against` an earlier run's
`--json` (another version of the code, say) also gives each path's change against its own earlier
captions, with a paired interval: does a change to decoding keep each path's quality?
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from captioner.api import DEFAULT_CHECKPOINT, Captioner
from captioner.decoding import DecodeConfig

from .data import DataSpec, load_dataset
from .metrics import caption_scores

log = logging.getLogger(__name__)
PATHS = ("fp32", "bf16", "int8", "onnx", "onnx_int8")


def load_path(name: str, checkpoint: str, onnx_file: Path | None) -> Captioner:
    if name in ("fp32", "bf16", "int8"):
        return Captioner.from_checkpoint(checkpoint, precision=name)
    return Captioner.from_checkpoint(onnx_file, precision="int8" if name == "onnx_int8" else "fp32")


def caption_all(model: Captioner, pixels: torch.Tensor, decode: DecodeConfig, batch_size: int = 16) -> tuple[list[str], float]:
    """Top captions of all photos, and the seconds it took."""
    texts: list[str] = []
    model.caption_pixels(pixels[:batch_size], decode)  # warm-up: allocator, kernels, the decoder's tables
    started = time.perf_counter()
    for start in range(0, len(pixels), batch_size):
        texts.extend(r.text for r in model.caption_pixels(pixels[start:start + batch_size], decode))
    return texts, time.perf_counter() - started


def compare(ids: list[str], texts: dict[str, list[str]], references: dict[str, list[str]], *,
            resamples: int = 1000, seed: int = 0, earlier: dict[str, dict[str, str]] | None = None) -> dict[str, dict]:
    """Per path: CIDEr-D, interval, change against fp32 (paired interval), identical share; with
    `earlier` (path -> image id -> caption), the same against the path's earlier captions."""
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(resamples, len(ids)))  # (R, N)
    per_image = {}
    report: dict[str, dict] = {}
    for name, captions in texts.items():
        scores, per_image[name] = _per_image(ids, captions, references)
        report[name] = {"CIDEr-D": scores["CIDEr-D"], "BLEU-4": scores["BLEU-4"]}
    for name, entry in report.items():
        entry["interval"] = [float(v) for v in np.percentile(per_image[name][draws].mean(axis=1), [2.5, 97.5])]
        if "fp32" in per_image:
            entry.update(_change(per_image[name], per_image["fp32"], texts[name], texts["fp32"], draws, "fp32"))
        if earlier is not None and name in earlier:
            before = [earlier[name][i] for i in ids]
            entry.update(_change(per_image[name], _per_image(ids, before, references)[1], texts[name], before, draws,
                                 "earlier"))
    return report


def _per_image(ids: list[str], captions: list[str], references: dict[str, list[str]]) -> tuple[dict, np.ndarray]:
    scores, cider = caption_scores(dict(zip(ids, captions)), references, meteor=False)
    return scores, np.asarray([cider[i] for i in ids])


def _change(ours: np.ndarray, theirs: np.ndarray, our_texts: list[str], their_texts: list[str], draws: np.ndarray,
            name: str) -> dict:
    """The mean per-photo change in CIDEr-D, its paired 95% interval, and the identical share."""
    delta = ours - theirs
    # Against fp32 the interval keeps the key earlier reports used, "delta_interval".
    return {f"delta_vs_{name}": float(delta.mean()),
            f"delta_interval_vs_{name}" if name != "fp32" else "delta_interval":
                [float(v) for v in np.percentile(delta[draws].mean(axis=1), [2.5, 97.5])],
            f"identical_to_{name}": sum(a == b for a, b in zip(our_texts, their_texts)) / len(our_texts)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="Flickr8k folder (captions.txt, images/, splits/)")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--onnx", type=Path, default=None, help="an export of the checkpoint (default: export one)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    parser.add_argument("--limit", type=int, default=None, help="first N photos only")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--json", type=Path, default=None, help="write the report (and every caption) here")
    parser.add_argument("--against", type=Path, default=None,
                        help="an earlier run's --json: also compare each path with its earlier captions")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    paths = [p for p in args.paths.split(",") if p]
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown paths {unknown}; choose from {', '.join(PATHS)}")
    if "fp32" not in paths:
        paths.insert(0, "fp32")  # the reference

    samples = load_dataset(DataSpec(format="flickr", path=args.data, limit=args.limit), args.split)
    ids = [s.image_id for s in samples]
    references = {s.image_id: s.captions for s in samples}
    reference_model = Captioner.from_checkpoint(args.checkpoint, precision="fp32")
    pixels = torch.stack([reference_model.load_pixels(s.image) for s in samples])  # (N, 3, S, S) uint8
    log.info("%d %s photos decoded", len(samples), args.split)
    decode = DecodeConfig(num_beams=args.num_beams)

    with tempfile.TemporaryDirectory(prefix="captioner-paths-") as folder:
        onnx_file = args.onnx
        if onnx_file is None and any(p.startswith("onnx") for p in paths):
            from captioner.runtime.onnx_export import export

            onnx_file = Path(folder) / "model.onnx"
            export(reference_model, onnx_file)
        texts, seconds, chosen = {}, {}, {}
        for name in paths:
            model = reference_model if name == "fp32" else load_path(name, args.checkpoint, onnx_file)
            texts[name], seconds[name] = caption_all(model, pixels, decode)
            chosen[name] = model.inference.to_dict()
            log.info("%s: %.1f s (%.1f images/s)", name, seconds[name], len(pixels) / seconds[name])
    earlier = json.loads(args.against.read_text())["captions"] if args.against else None
    if earlier is not None and any(set(earlier[n]) != set(ids) for n in paths if n in earlier):
        raise SystemExit(f"{args.against}: not the same photos as this run")
    report = compare(ids, texts, references, resamples=args.bootstrap, earlier=earlier)
    print(f"{args.split}: {len(ids)} photos, beam {args.num_beams}, tags on; checkpoint {args.checkpoint}")
    print(f"{'path':10}{'CIDEr-D':>9}{'95% interval':>18}{'vs fp32':>9}{'paired interval':>20}{'identical':>11}{'images/s':>10}")
    for name, entry in report.items():
        low, high = entry["interval"]
        delta_low, delta_high = entry["delta_interval"]
        print(f"{name:10}{entry['CIDEr-D']:>9.4f}{f'[{low:.4f}, {high:.4f}]':>18}{entry['delta_vs_fp32']:>+9.4f}"
              f"{f'[{delta_low:+.4f}, {delta_high:+.4f}]':>20}{entry['identical_to_fp32']:>11.1%}"
              f"{len(ids) / seconds[name]:>10.1f}")
    if earlier is not None:
        print(f"\nagainst {args.against}:")
        print(f"{'path':10}{'vs earlier':>11}{'paired interval':>20}{'identical':>11}")
        for name, entry in report.items():
            if "delta_vs_earlier" in entry:
                low, high = entry["delta_interval_vs_earlier"]
                print(f"{name:10}{entry['delta_vs_earlier']:>+11.4f}{f'[{low:+.4f}, {high:+.4f}]':>20}"
                      f"{entry['identical_to_earlier']:>11.1%}")
    for name, entry in report.items():
        entry["images_per_s"] = len(ids) / seconds[name]
        entry["inference"] = chosen[name]
    if args.json is not None:
        args.json.write_text(json.dumps({"split": args.split, "photos": len(ids), "report": report,
                                         "captions": {n: dict(zip(ids, t)) for n, t in texts.items()}}, indent=1))
    print(json.dumps({name: {k: v for k, v in entry.items() if k != "inference"} for name, entry in report.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
