"""Visual concepts learned from captions: word detectors for guided decoding.

    python -m training.concepts --model runs/flickr8k_coco/best.pt --config training/configs/flickr8k_coco.yaml \
        --out runs/concepts/tagger.pt --report runs/concepts/report.json

After Fang et al. 2015 ("From captions to visual concepts and back"): for each object or scene word
(the COCO object names and their synonyms, `SCENES`, and the ImageNet tagger's words, kept where
at least `--min-photos` training photos' captions name them and the model's vocabulary has them),
a logistic output on the encoder's pooled features (E,) is trained on every training photo of the
config's data sets, with the share of the photo's captions that name the word (any of its forms:
singular or plural) as its soft label. Its output then estimates the probability that a caption
of the photo names the word, the quantity guidance thresholds. The photos' cached views (the
plain one and its light augmentations) are all training examples.

A tenth of the training photos is held out: the L2 weight is chosen on it (mean average precision)
and one global Platt a, b is fitted on it. Average precision per word (a photo is positive when any
of its captions names the word) is reported on each validation set. The result is a `Tagger`
with `activation="sigmoid"`: `captioner export --tagger` attaches it to a model in place of the
ImageNet one, on both runtimes (it is a linear head on the pooled vector, as the ImageNet head is).
Features come from the training feature cache (`training.features`), so nothing is encoded twice.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as nnf

from captioner.checkpoint import load_checkpoint
from captioner.encoder import Encoder, EncoderConfig
from captioner.files import atomic_path
from captioner.preprocessing import Preprocessing
from captioner.tagger import Tagger
from captioner.vocab import Vocabulary, tokenize

from .calibrate_tagger import fit_platt
from .config import load_config
from .data import Sample, load_dataset
from .features import build_or_load
from .objects import SYNONYMS, _plural

log = logging.getLogger(__name__)

# Scenes and things around objects that captions name and the 80 COCO categories do not.
SCENES = (
    "beach", "ocean", "sea", "lake", "river", "water", "wave", "waves", "pool", "snow", "grass", "field", "park",
    "street", "road", "sidewalk", "city", "building", "tree", "trees", "forest", "mountain", "hill", "sky",
    "kitchen", "bathroom", "bedroom", "room", "office", "restaurant", "store", "market", "stage", "crowd",
    "food", "plate", "meat", "vegetables", "fruit", "salad", "coffee", "tea", "wine", "beer", "bread", "rice",
    "window", "door", "wall", "floor", "fence", "sign", "flowers", "flower", "rock", "rocks", "sand", "dirt",
    "mirror", "shower", "tub", "counter", "cabinets", "lamp", "shelf", "box", "bag", "basket", "tray", "pan",
    "glass", "glasses", "shirt", "jacket", "hat", "helmet", "dress", "uniform", "costume", "tracks", "station",
    "airport", "runway", "harbor", "dock", "bridge", "tower", "fountain", "playground", "court", "track",
)


def concept_words(vocabulary: Vocabulary, imagenet_words: list[str]) -> list[str]:
    """Candidate words (singular where there is one) that the vocabulary can say."""
    names = {name for names in SYNONYMS.values() for name in names if " " not in name}
    candidates = sorted(names | set(SCENES) | set(imagenet_words))
    return [w for w in candidates if any(f in vocabulary.index for f in forms_of(w))]


def forms_of(word: str) -> list[str]:
    plural = _plural(word)
    return [word] if plural == word else [word, plural]


def soft_labels(samples: list[Sample], forms: dict[str, list[str]], words: list[str]) -> torch.Tensor:
    """(N, W): the share of each photo's captions that name each word."""
    column = {form: i for i, w in enumerate(words) for form in forms[w]}
    y = torch.zeros(len(samples), len(words))
    for row, sample in enumerate(samples):
        for caption in sample.captions:
            named = {column[t] for t in tokenize(caption) if t in column}
            for i in named:
                y[row, i] += 1.0 / len(sample.captions)
    return y


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """(N, W) scores, (N, W) bool -> (W,) average precision (NaN for a word with no positive)."""
    order = scores.argsort(dim=0, descending=True)
    hits = positive.gather(0, order).float()  # (N, W), best first
    precision = hits.cumsum(0) / torch.arange(1, len(hits) + 1).unsqueeze(1)
    count = hits.sum(0)
    return torch.where(count > 0, (precision * hits).sum(0) / count.clamp_min(1), torch.nan)


def fit_detectors(x: torch.Tensor, y: torch.Tensor, *, weight_decay: float,
                  steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic word detectors on features x (N, E) with soft labels y (N, W) -> weight (W, E),
    bias (W,). L2-regularised logistic regression is convex: full-batch L-BFGS reaches its optimum
    with no learning rate or epochs to tune."""
    mean, scale = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / scale  # standardised, so one weight decay suits every feature
    weight = torch.zeros(y.shape[1], x.shape[1], requires_grad=True)
    bias = y.mean(0).clamp(1e-4, 1 - 1e-4).logit().requires_grad_(True)  # starts at each word's base rate
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = nnf.binary_cross_entropy_with_logits(torch.addmm(bias, z, weight.t()), y)
        loss = loss + weight_decay * weight.square().sum() / y.shape[1]
        loss.backward()
        return loss
    optimiser.step(closure)
    with torch.no_grad():  # fold the standardisation into the head: logits = x @ w.T + b
        folded = weight / scale
        return folded.detach(), (bias - folded @ mean).detach()


def absent_words(confidence: torch.Tensor, named: torch.Tensor, words: list[str], below: float, *,
                 max_miss: float, min_photos: int = 50) -> list[str]:
    """Words whose confidence below `below` reliably means no caption names them: of the photos
    (at least `min_photos`) where it is that low, at most `max_miss` have a caption that does.
    confidence (N, W), named (N, W) bool, on photos the detectors were not fitted on."""
    low = confidence < below  # (N, W)
    count = low.sum(0)
    miss = (low & named).sum(0) / count.clamp_min(1)
    return [w for w, n, m in zip(words, count.tolist(), miss.tolist()) if n >= min_photos and m <= max_miss]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.concepts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint whose vocabulary and encoder the tagger serves")
    parser.add_argument("--config", required=True, help="training config: its data.train and data.val sets")
    parser.add_argument("--out", required=True, help="the tagger file (captioner export --tagger)")
    parser.add_argument("--report", help="JSON: average precision per word and validation set")
    parser.add_argument("--min-photos", type=int, default=20, help="keep words named for at least this many training photos")
    parser.add_argument("--weight-decay", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3],
                        help="L2 weights to try; the one with the best held-out mAP is kept")
    parser.add_argument("--threshold", type=float, default=0.5, help="guidance: require words at or above this confidence")
    parser.add_argument("--max-tags", type=int, default=2)
    parser.add_argument("--absent-below", type=float, default=0.02,
                        help="guidance: ban a word below this confidence, where that reliably means no caption names it")
    parser.add_argument("--absent-max-miss", type=float, default=0.01,
                        help="... at most this share of held-out photos that low have a caption naming it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    cfg = load_config(args.config)
    payload = load_checkpoint(args.model)
    vocabulary = Vocabulary.from_dict(payload["vocabulary"])
    encoder = Encoder(EncoderConfig(backbone=payload["encoder"]["backbone"])).eval()
    preprocessing = Preprocessing.from_dict(payload["preprocessing"])
    words = concept_words(vocabulary, Tagger.imagenet(encoder.config.backbone).words)
    forms = {w: [f for f in forms_of(w) if f in vocabulary.index] for w in words}

    def features(samples: list[Sample], views: int) -> tuple[list[torch.Tensor], list[Sample]]:
        """Pooled features (N, E) of each cached view of one data set (training's caches), and the
        samples every view could read."""
        caches = [build_or_load(encoder, preprocessing, [s.image for s in samples], cfg.data.cache_dir, view=v)
                  for v in range(views)]
        usable = [s for s in samples if all(c.usable(s.image) for c in caches)]
        return [torch.cat([c.regions([s.image for s in usable[i:i + 256]]).mean(1) for i in range(0, len(usable), 256)])
                for c in caches], usable

    per_set = [features(load_dataset(spec, cfg.data.train_split), cfg.data.cache_views) for spec in cfg.data.train]
    views = [torch.cat([set_views[v] for set_views, _ in per_set]) for v in range(cfg.data.cache_views)]
    train = [s for _, samples in per_set for s in samples]
    y = soft_labels(train, forms, words)
    kept = (y > 0).sum(0) >= args.min_photos
    words = [w for w, k in zip(words, kept.tolist()) if k]
    y = y[:, kept]
    held = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: len(train) // 10]
    fit = torch.ones(len(train), dtype=torch.bool)
    fit[held] = False
    x_fit = torch.cat([v[fit] for v in views])
    y_fit = y[fit].repeat(len(views), 1)
    log.info("%d concept words; %d training photos x %d views, %d held out", len(words), int(fit.sum()), len(views), len(held))

    best = None
    for decay in args.weight_decay:
        weight, bias = fit_detectors(x_fit, y_fit, weight_decay=decay)
        logits = torch.addmm(bias, views[0][held], weight.t())  # (held, W)
        ap = average_precision(logits, y[held] > 0).nanmean().item()
        log.info("weight decay %g: held-out mAP %.3f", decay, ap)
        if best is None or ap > best[0]:
            best = (ap, decay, weight, bias, logits)
    held_map, decay, weight, bias, logits = best
    # Platt scaling on the held-out photos, fitted on what Tagger.calibrate reads: the sigmoid outputs
    a, b = fit_platt(logits.sigmoid().flatten().double(), (y[held] > 0).flatten().double())
    tagger = Tagger(weight, bias, words, words, {w: forms[w] for w in words},
                    calibration={"a": a, "b": b, "input": "logit"}, backbone=encoder.config.backbone,
                    guidance={"threshold": args.threshold, "max_tags": args.max_tags}, activation="sigmoid")
    banned = absent_words(tagger.word_probs(views[0][held]), y[held] > 0, words, args.absent_below,
                          max_miss=args.absent_max_miss)
    tagger.guidance.update(absent_below=args.absent_below, absent_words=banned)

    report = {"words": len(words), "weight_decay": decay, "held_out_mAP": held_map, "absent_words": banned,
              "calibration": {"a": a, "b": b}, "validation": {}}
    for spec in cfg.data.val:
        [pooled], samples = features(load_dataset(spec, cfg.data.val_split), 1)
        positive = soft_labels(samples, tagger.forms, words) > 0
        probs = tagger.word_probs(pooled)
        ap = average_precision(probs, positive)
        present = ~ap.isnan()
        per_word = {w: round(float(v), 4) for w, v, p in zip(words, ap, present) if p}
        report["validation"][spec.label] = {
            "photos": len(samples), "words_present": int(present.sum()), "mAP": float(ap[present].mean()),
            "ap": dict(sorted(per_word.items(), key=lambda kv: -kv[1])),
        }
        log.info("%s: mAP %.3f over the %d words its %d photos name", spec.label, float(ap[present].mean()),
                 int(present.sum()), len(samples))
    with atomic_path(args.out) as temporary:
        torch.save(tagger.to_dict(), temporary)
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "validation"}
                     | {f"{name}_mAP": round(r["mAP"], 4) for name, r in report["validation"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
