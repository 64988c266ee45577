"""Calibrate the ImageNet tagger's confidences on photos with human captions.

    python -m training.calibrate_tagger --data ../shared/data/flickr8k --out captioner/data/imagenet_words.json

A word's raw score (the summed ImageNet probability of its classes, see `captioner.tagger`) is not
the probability that people write the word. Platt scaling fits one global a, b on the Flickr8k
TRAIN photos, where a (photo, word) pair is positive when at least one of the photo's five
captions contains the word or one of its forms. Pairs whose raw score is at or below `--floor` are
left out: every photo has hundreds of words at ~0, which would only teach the fit that nothing is
there.

Two inputs are fitted and reported; `--input` chooses the one written (default logit):
p = sigmoid(a * log(raw) + b) can never exceed sigmoid(b), as log(raw) <= 0, and with the fitted
b that is about 0.71, while 93% of train pairs with raw > 0.95 are positive. p = sigmoid(a *
logit(raw) + b) has no such ceiling, and it fits better on dev (see the printed table).

Pooled features come from the shared feature cache (`training.features`), built with the
pretrained encoder and squash preprocessing exactly as training builds it, so no photo is encoded
twice. Reliability (expected calibration error over 10 equal-width bins, Brier score) is reported
on the Flickr8k dev split and on COCO-MINI (out of domain), before and after calibration, and
written with a, b into the mapping file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from captioner.encoder import Encoder, EncoderConfig
from captioner.tagger import PLATT_INPUTS, WORDS_FILE, Tagger, platt_input
from captioner.vocab import tokenize

from .data import DataSpec, Sample, load_dataset
from .features import build_or_load
from .make_tag_words import write_json

DEFAULT_FLOOR = 0.01
BINS = 10


def pooled_features(encoder: Encoder, samples: list[Sample], cache_dir: str, *, chunk: int = 256) -> tuple[torch.Tensor, list[Sample]]:
    """(N, E) pooled features of the samples whose image the cache could read, and those samples."""
    preprocessing = dataclasses.replace(encoder.native_preprocessing, resize="squash")
    cache = build_or_load(encoder, preprocessing, [s.image for s in samples], cache_dir)
    usable = [s for s in samples if cache.usable(s.image)]
    pooled = [cache.regions([s.image for s in usable[i:i + chunk]]).mean(1) for i in range(0, len(usable), chunk)]
    return torch.cat(pooled), usable  # (N, E)


def labels(tagger: Tagger, samples: list[Sample]) -> torch.Tensor:
    """(N, W) 1.0 where some caption of the photo names the word (any of its forms)."""
    y = torch.zeros(len(samples), len(tagger.words))
    for row, sample in enumerate(samples):
        tokens = {t for caption in sample.captions for t in tokenize(caption)}
        for column, word in enumerate(tagger.words):
            if tokens.intersection(tagger.forms[word]):
                y[row, column] = 1.0
    return y


def pairs(tagger: Tagger, pooled: torch.Tensor, samples: list[Sample], floor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw scores, labels and word columns of the (photo, word) pairs with raw > floor."""
    raw, _ = tagger.raw_scores(pooled)  # (N, W)
    y = labels(tagger, samples)
    keep = raw > floor
    columns = torch.arange(raw.shape[1]).expand_as(raw)
    return raw[keep].double(), y[keep].double(), columns[keep]


def fit_platt(raw: torch.Tensor, y: torch.Tensor, kind: str = "logit", iterations: int = 50) -> tuple[float, float]:
    """Maximum-likelihood a, b of p = sigmoid(a * f(raw) + b), f = logit or log, by Newton's method."""
    x = torch.stack([platt_input(raw, kind), torch.ones_like(raw)], dim=1)  # (n, 2)
    theta = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(x @ theta)
        gradient = x.t() @ (p - y)
        hessian = (x * (p * (1 - p)).unsqueeze(1)).t() @ x + 1e-9 * torch.eye(2, dtype=torch.float64)
        step = torch.linalg.solve(hessian, gradient)
        theta = theta - step
        if step.abs().max() < 1e-10:
            break
    return float(theta[0]), float(theta[1])


def reliability(p: torch.Tensor, y: torch.Tensor, bins: int = BINS) -> dict:
    """Expected calibration error (equal-width bins) and Brier score of probabilities p for labels y."""
    index = (p * bins).long().clamp(max=bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(p[inside].mean()) - float(y[inside].mean()))
    q = p.clamp(1e-7, 1 - 1e-7)
    log_loss = float(-(y * q.log() + (1 - y) * (1 - q).log()).mean())
    return {"ece": round(ece, 4), "brier": round(float(((p - y) ** 2).mean()), 4), "log_loss": round(log_loss, 4),
            "pairs": int(p.numel()), "positives": int(y.sum())}


def tag_precision(tagger: Tagger, pooled: torch.Tensor, samples: list[Sample], threshold: float = 0.5) -> dict:
    """What `Tagger.tags` gives at its default threshold: tags per photo and their precision."""
    y = labels(tagger, samples)
    tags = tagger.tags(pooled, threshold=threshold, max_tags=2)
    column = {w: i for i, w in enumerate(tagger.words)}
    hits = [float(y[row, column[t.word]]) for row, image in enumerate(tags) for t in image]
    return {"threshold": threshold, "tags_per_photo": round(len(hits) / max(1, len(samples)), 3),
            "precision": round(sum(hits) / len(hits), 4) if hits else None}


def absent_words(tagger: Tagger, pooled: torch.Tensor, samples: list[Sample], *, below: float,
                 min_photos: int, max_miss: float) -> dict[str, dict]:
    """The words whose low confidence reliably means no caption names them: among the photos
    whose captions name the word (at least `min_photos` of them), at most `max_miss` have a
    confidence below `below`. -> word: {photos, miss rate, share of the other photos below}."""
    y = labels(tagger, samples)  # (N, W)
    low = (tagger.word_probs(pooled) < below).double()
    found = {}
    for column, word in enumerate(tagger.words):
        positives = int(y[:, column].sum())
        if positives < min_photos:
            continue
        miss = float((low[:, column] * y[:, column]).sum()) / positives
        others = float((low[:, column] * (1 - y[:, column])).sum()) / max(1, len(samples) - positives)
        if miss <= max_miss:
            found[word] = {"photos": positives, "miss": round(miss, 4), "excluded_share_of_others": round(others, 4)}
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the Flickr8k folder (fit on train, report on dev)")
    parser.add_argument("--coco", default="../shared/data/coco_mini", help="a COCO folder for an out-of-domain check ('' to skip)")
    parser.add_argument("--coco-split", default="train")
    parser.add_argument("--out", default=str(WORDS_FILE), help="the mapping file to read and to write a, b into")
    parser.add_argument("--cache-dir", default="cache/features")
    parser.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="pairs with a raw score at or below this are left out")
    parser.add_argument("--input", choices=PLATT_INPUTS, default="logit", help="what Platt scaling is linear in")
    parser.add_argument("--threshold", type=float, default=0.5, help="guidance: require tags at this confidence")
    parser.add_argument("--max-tags", type=int, default=2, help="guidance: at most this many required tags")
    parser.add_argument("--absent-below", type=float, nargs="+", default=[0.05, 0.08, 0.1, 0.15, 0.2],
                        help="guidance: exclude a reliable word below this confidence (the largest of these "
                             "at which some word is reliable)")
    parser.add_argument("--absent-min-photos", type=int, default=100,
                        help="a word is judged reliable on at least this many training photos naming it")
    parser.add_argument("--absent-max-miss", type=float, default=0.02,
                        help="reliable: at most this share of the photos naming it fall below --absent-below")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)

    mapping = json.loads(Path(args.out).read_text(encoding="utf-8"))
    head = Tagger.imagenet(words_file=args.out)
    tagger = Tagger(head.weight, head.bias, head.class_names, head.class_words, head.forms,
                    calibration=None, class_ids=head.class_ids)  # raw scores
    encoder = Encoder(EncoderConfig()).eval()

    flickr = DataSpec(format="flickr", path=args.data)
    sets = {"flickr8k train": (flickr, "train"), "flickr8k dev": (flickr, "dev")}
    if args.coco:
        sets["coco-mini"] = (DataSpec(format="coco", path=args.coco), args.coco_split)
    data = {}
    for name, (spec, split) in sets.items():
        pooled, samples = pooled_features(encoder, load_dataset(spec, split), args.cache_dir)
        data[name] = (pooled, samples, *pairs(tagger, pooled, samples, args.floor))

    _, train_samples, raw, y, _ = data["flickr8k train"]
    print(f"Platt scaling on {len(train_samples)} Flickr8k train photos, {raw.numel()} pairs with raw > "
          f"{args.floor} ({int(y.sum())} positive)")
    fits = {kind: fit_platt(raw, y, kind) for kind in PLATT_INPUTS}
    taggers = {kind: Tagger(head.weight, head.bias, head.class_names, head.class_words, head.forms,
                            calibration={"a": a, "b": b, "input": kind}, class_ids=head.class_ids)
               for kind, (a, b) in fits.items()}
    for kind, (a, b) in fits.items():
        print(f"  sigmoid(a * {kind}(raw) + b): a = {a:.4f}, b = {b:.4f}{'   <- written' if kind == args.input else ''}")
    calibrated = taggers[args.input]
    a, b = fits[args.input]
    report = {}
    methods = ["raw", *fits]
    print(f"{'':16s} {'pairs':>6s} {'pos':>5s}   ECE: " + " ".join(f"{m:>6s}" for m in methods)
          + "   Brier: " + " ".join(f"{m:>6s}" for m in methods) + "   tags/photo  precision")
    for name, (pooled, samples, raw, y, columns) in data.items():
        scores = {"raw": reliability(raw.clamp(max=1.0), y),
                  **{kind: reliability(t.calibrate(raw), y) for kind, t in taggers.items()}}
        tags = tag_precision(calibrated, pooled, samples)
        report[name] = {**scores[args.input], "ece_raw": scores["raw"]["ece"], "brier_raw": scores["raw"]["brier"],
                        "photos": len(samples), **tags}
        print(f"{name:16s} {len(raw):6d} {int(y.sum()):5d}        " + " ".join(f"{scores[m]['ece']:6.4f}" for m in methods)
              + "          " + " ".join(f"{scores[m]['brier']:6.4f}" for m in methods)
              + f"   {tags['tags_per_photo']:10.3f}  {tags['precision'] or 0:9.3f}")
    pooled, samples, raw, y, columns = data["flickr8k dev"]
    p = calibrated.calibrate(raw)
    rows = []
    for column in columns.unique().tolist():
        inside = columns == column
        if int(inside.sum()) >= 15:
            rows.append((float(p[inside].mean()) - float(y[inside].mean()), calibrated.words[column],
                         int(inside.sum()), float(p[inside].mean()), float(y[inside].mean())))
    rows.sort()
    print("dev words furthest from calibrated (>= 15 pairs): word, pairs, mean confidence, positive rate")
    for gap, word, n, confidence, rate in rows[:5] + rows[-5:]:
        print(f"  {word:12s} {n:5d} {confidence:6.3f} {rate:6.3f}")

    mapping["calibration"] = {
        "a": round(a, 6), "b": round(b, 6), "input": args.input,
        "method": f"Platt scaling, p = sigmoid(a * {args.input}(raw) + b); raw = summed softmax probability of the word's classes",
        "fitted_on": f"flickr8k train: {len(train_samples)} photos, pairs with raw > {args.floor}",
        "positive": "some reference caption of the photo contains the word or one of its forms",
        "preprocessing": "squash 224, the pretrained efficientnet_lite0 encoder (training's feature cache)",
        "reliability": report,
        "bins": BINS,
    }
    pooled, samples = data["flickr8k train"][:2]
    below, absent = 0.0, {}
    for candidate in sorted(args.absent_below):
        found = absent_words(calibrated, pooled, samples, below=candidate, min_photos=args.absent_min_photos,
                             max_miss=args.absent_max_miss)
        print(f"  reliable below {candidate}: {found}")
        if found:
            below, absent = candidate, found
    print(f"words excluded below confidence {below} (train photos naming them, miss rate, "
          f"share of the other photos excluded): {absent}")
    mapping["guidance"] = {
        "threshold": args.threshold, "max_tags": args.max_tags, "absent_below": below,
        "absent_words": sorted(absent), "absent_evidence": absent,
        "absent_rule": f"on the flickr8k train photos, at least {args.absent_min_photos} name the word and at most "
                       f"{args.absent_max_miss:.0%} of those have a confidence below {below}",
    }
    write_json(mapping, args.out)
    if not (math.isfinite(a) and math.isfinite(b)):
        raise SystemExit("calibration did not converge")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
