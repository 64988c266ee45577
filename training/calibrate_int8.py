"""Calibrate the int8 encoder: the activation ranges ONNX Runtime's static quantisation needs,
measured on training photos, written as a small JSON file.

    python -m training.calibrate_int8 ../shared/data/flickr8k/images \
        --names ../shared/data/flickr8k/splits/train.txt --count 256 [--checkpoint CKPT] \
        [--out captioner/data/int8_calibration.json]

The encoder (with its uint8 -> float normalisation) is exported to ONNX as `captioner export
--format onnx` exports it, the photos (`--count` of them, spread evenly over the sorted file list,
only names in `--names` when given) pass through it, and every quantised tensor's range is kept
(`--method percentile`: the 0.01% and 99.99% points of its histogram, which quantise real photos
closer to fp32 than the plain min/max). The file names the encoder's weights (SHA-256), so an
export or an int8 load of another encoder refuses it. The default output is the calibration
shipped for the bundled model's encoder (the frozen ImageNet EfficientNet-Lite0, which every
checkpoint with that frozen encoder shares).
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

from captioner.api import Captioner
from captioner.runtime.onnx_export import (CALIBRATION_FILE, CALIBRATION_FORMAT_VERSION, calibrate, encoder_digest,
                                           export_encoder)
from captioner.runtime.onnxrt import require

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def pick_photos(folder: Path, count: int, names: Path | None = None) -> list[Path]:
    """`count` photos spread evenly over the folder's sorted images (only `names` when given)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if names is not None:
        wanted = {line.strip() for line in names.read_text(encoding="utf-8").splitlines() if line.strip()}
        paths = [p for p in paths if p.name in wanted]
    if not paths:
        raise ValueError(f"no photos in {folder}" + (f" named in {names}" if names else ""))
    if count >= len(paths):
        return paths
    step = len(paths) / count
    return [paths[int(i * step)] for i in range(count)]


def calibrate_model(model: Captioner, photos: list[Path], *, batch_size: int = 16, method: str = "percentile",
                    percentile: float = 99.99, source: str = "") -> dict:
    """The calibration file's contents for `model`'s encoder over `photos`."""
    require("onnx", "onnxruntime", "onnxscript")
    import onnxruntime

    def batches():
        for start in range(0, len(photos), batch_size):
            yield torch.stack([model.load_pixels(p) for p in photos[start:start + batch_size]])

    with tempfile.TemporaryDirectory(prefix="captioner-calibrate-") as folder:
        graph = Path(folder) / "encoder.onnx"
        export_encoder(model, graph)
        ranges = calibrate(graph, batches(), method=method, percentile=percentile)
    return {
        "format_version": CALIBRATION_FORMAT_VERSION,
        "backbone": model.encoder.config.backbone,
        "encoder_sha256": encoder_digest(model.encoder),
        "method": method,
        "percentile": percentile if method == "percentile" else None,
        "photos": len(photos),
        "source": source,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ranges": {name: [round(low, 6), round(high, 6)] for name, (low, high) in sorted(ranges.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", type=Path, help="folder of training photos")
    parser.add_argument("--names", type=Path, default=None, help="only photos named in this file (a split list)")
    parser.add_argument("--count", type=int, default=256, help="photos to calibrate on (default: 256)")
    parser.add_argument("--checkpoint", default=None, help="model checkpoint (default: the bundled model)")
    parser.add_argument("--method", choices=["percentile", "minmax"], default="percentile")
    parser.add_argument("--percentile", type=float, default=99.99)
    parser.add_argument("--out", type=Path, default=CALIBRATION_FILE,
                        help=f"output JSON (default: {CALIBRATION_FILE}, the bundled encoder's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    model = (Captioner.from_checkpoint(args.checkpoint, precision="fp32") if args.checkpoint
             else Captioner.default(precision="fp32"))
    photos = pick_photos(args.photos, args.count, args.names)
    started = time.perf_counter()
    source = f"{args.photos.name}/" + (f" ({args.names.name})" if args.names else "")
    result = calibrate_model(model, photos, method=args.method, percentile=args.percentile, source=source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    log.info("%d photos, %d tensor ranges in %.0f s -> %s (%.1f kB)", len(photos), len(result["ranges"]),
             time.perf_counter() - started, args.out, args.out.stat().st_size / 1e3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
