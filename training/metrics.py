"""Caption metrics from pycocoevalcap's scorers (the coco-caption toolkit): BLEU-1..4, METEOR
(when Java is present), ROUGE-L and CIDEr-D. SPICE is left out: it downloads a parser at run time.

Captions are tokenised with the model's own tokenizer (lowercase, punctuation dropped), as the
toolkit's PTB tokenizer does, without needing Java for it.

Also: object mentions against the references and, where a photo's object annotations are known,
CHAIR hallucination rates (`object_metrics`, with `training.objects`), and percentile bootstrap
intervals over photos (`bootstrap_intervals`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
from typing import Mapping

import numpy as np

from captioner.vocab import tokenize

from .objects import mentioned_objects, mentioned_scenes, reference_objects

log = logging.getLogger(__name__)


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]], *, meteor: bool = True) -> dict[str, float]:
    """predictions: image id -> caption; references: image id -> human captions."""
    return caption_scores(predictions, references, meteor=meteor)[0]


def caption_scores(predictions: dict[str, str], references: dict[str, list[str]], *,
                   meteor: bool = True) -> tuple[dict[str, float], dict[str, float]]:
    """`caption_metrics`, and each image's own CIDEr-D (image id -> score; their mean is the
    corpus CIDEr-D), from one scoring pass."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _toolkit_inputs(predictions, references)
    scores: dict[str, float] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
    scores.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    if meteor and shutil.which("java"):
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            scores["METEOR"] = float(scorer.compute_score(gts, res)[0])
        finally:
            _close_meteor(scorer)
    elif meteor:
        log.warning("METEOR skipped: no Java runtime on PATH")
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    cider, per_image = Cider().compute_score(gts, res)  # per_image in the order of gts' keys
    scores["CIDEr-D"] = float(cider)
    return scores, {i: float(c) for i, c in zip(gts, per_image)}


def _toolkit_inputs(predictions: Mapping[str, str], references: Mapping[str, list[str]]):
    """-> (gts, res) as pycocoevalcap's scorers take them, tokenised, in sorted id order."""
    ids = _ids_with_references(predictions, references)
    res = {i: [" ".join(tokenize(predictions[i])) or "<empty>"] for i in ids}
    gts = {i: [" ".join(tokenize(r)) for r in references[i]] for i in ids}
    return gts, res


def _ids_with_references(predictions: Mapping[str, str], references: Mapping[str, list[str]]) -> list[str]:
    ids = sorted(predictions)
    missing = [i for i in ids if i not in references]
    if missing:
        raise ValueError(f"no references for {len(missing)} images, e.g. {missing[:3]}")
    return ids


def cider_per_image(predictions: dict[str, str], references: dict[str, list[str]]) -> dict[str, float]:
    """Each image's own CIDEr-D (image id -> score), the document frequencies taken over all of
    them; the mean is the corpus CIDEr-D that `caption_metrics` reports."""
    from pycocoevalcap.cider.cider import Cider

    gts, res = _toolkit_inputs(predictions, references)
    per_image = Cider().compute_score(gts, res)[1]  # in the order of gts' keys
    return {i: float(c) for i, c in zip(gts, per_image)}


def _close_meteor(scorer) -> None:
    with contextlib.suppress(Exception):
        with scorer.lock:
            scorer.meteor_p.stdin.close()
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()


def diversity(predictions: dict[str, str]) -> dict[str, float]:
    """How varied the captions are: share of the most repeated caption, distinct captions."""
    captions = list(predictions.values())
    if not captions:
        return {"top_caption_share": 0.0, "distinct_captions": 0.0}
    counts: dict[str, int] = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    return {"top_caption_share": max(counts.values()) / len(captions), "distinct_captions": len(counts) / len(captions)}


# -- objects ------------------------------------------------------------------------------------

def object_metrics(predictions: dict[str, str], references: dict[str, list[str]], *,
                   annotations: Mapping[str, set[str]] | None = None, min_refs: int = 3) -> dict[str, float]:
    """Which COCO objects (`training.objects`) the captions name, against what the photo holds.

    object_recall     of the objects that at least `min_refs` of a photo's reference captions name
                      (all of them, for a photo with fewer references), the share its caption
                      names; micro-averaged over all photos.
    object_precision  of the objects the captions name (each at most once per caption), the share
                      that at least one reference caption of that photo names.
    object_scene_recall, object_scene_precision
                      the same over the objects and the scenes of `objects.SCENES` (food, kitchen,
                      street, water, grass) together: the lexicon issue #27 names for its hidden
                      photos (whose precision counts support more strictly; docs/out-of-domain.md).

    With `annotations` (image id -> the categories annotated in it, `objects.load_instances`),
    over the photos it covers, CHAIR (Rohrbach et al. 2018):

    CHAIR_i           the share of the objects the captions name that are hallucinated, and
    CHAIR_s           the share of captions that name at least one hallucinated object; an object
                      is hallucinated when it is neither annotated in the photo nor named by any of
                      its reference captions (the paper's ground truth: both together).
    annotation_recall (not CHAIR's, an extra) the share of the annotated categories the caption
                      names; low by nature, since captions name only the salient objects.

    A share with nothing to count (no caption names an object, say) is 0.0.
    """
    counts = _object_counts(predictions, references, annotations, min_refs)
    return {name: _ratio(*(counts[c].sum() for c in columns)) for name, columns in _OBJECT_RATIOS.items()
            if columns[1] in counts}


# metric -> (numerator, denominator) columns of _object_counts
_OBJECT_RATIOS = {
    "object_recall": ("recalled", "salient"),
    "object_precision": ("supported", "mentioned"),
    "object_scene_recall": ("recalled_with_scenes", "salient_with_scenes"),
    "object_scene_precision": ("supported_with_scenes", "mentioned_with_scenes"),
    "CHAIR_i": ("hallucinated", "mentioned_annotated"),
    "CHAIR_s": ("hallucinating", "captions_annotated"),
    "annotation_recall": ("named_annotated", "annotated"),
}


def _ratio(numerator, denominator) -> float:
    return float(numerator / denominator) if denominator else 0.0


def _object_counts(predictions: Mapping[str, str], references: Mapping[str, list[str]],
                   annotations: Mapping[str, set[str]] | None, min_refs: int) -> dict[str, np.ndarray]:
    """Per photo (in sorted id order) the counts the object metrics are ratios of."""
    ids = _ids_with_references(predictions, references)
    columns: dict[str, list[int]] = {c: [] for base in ("recalled", "salient", "supported", "mentioned")
                                     for c in (base, f"{base}_with_scenes")}
    covered = annotations is not None and any(i in annotations for i in ids)
    if covered:
        for c in ("hallucinated", "mentioned_annotated", "hallucinating", "captions_annotated",
                  "named_annotated", "annotated"):
            columns[c] = []
    for i in ids:
        named = mentioned_objects(predictions[i])
        salient, in_references = reference_objects(references[i], min_refs)
        objects = _mention_counts(named, salient, in_references)
        scenes = _mention_counts(mentioned_scenes(predictions[i]),
                                 *reference_objects(references[i], min_refs, mentioned=mentioned_scenes))
        for column, count, scene_count in zip(("recalled", "salient", "supported", "mentioned"), objects, scenes):
            columns[column].append(count)
            columns[f"{column}_with_scenes"].append(count + scene_count)
        if covered:
            truth = annotations.get(i)
            known = truth is not None  # photos the annotations do not cover count nowhere here
            hallucinated = named - (truth or set()) - in_references if known else set()
            columns["hallucinated"].append(len(hallucinated))
            columns["mentioned_annotated"].append(len(named) if known else 0)
            columns["hallucinating"].append(int(bool(hallucinated)))
            columns["captions_annotated"].append(int(known))
            columns["named_annotated"].append(len(named & truth) if known else 0)
            columns["annotated"].append(len(truth) if known else 0)
    return {c: np.asarray(v, dtype=np.int64) for c, v in columns.items()}


def _mention_counts(named: set[str], salient: set[str], in_references: set[str]) -> tuple[int, int, int, int]:
    """-> how many of the salient things the caption names, the salient ones, the named ones some
    reference names, the named ones."""
    return len(named & salient), len(salient), len(named & in_references), len(named)


# -- confidence intervals -----------------------------------------------------------------------

def bootstrap_intervals(predictions: dict[str, str], references: dict[str, list[str]], *,
                        cider: Mapping[str, float] | None = None, annotations: Mapping[str, set[str]] | None = None,
                        min_refs: int = 3, resamples: int = 1000, confidence: float = 0.95,
                        seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over photos: the photos are drawn with replacement
    `resamples` times (a fixed `seed`, so the same inputs give the same intervals), each metric is
    recomputed on every draw, and the interval is the middle `confidence` of those values.

    CIDEr-D: the mean of the drawn photos' own scores (`cider`, image id -> score, as
    `caption_scores` and `cider_per_image` give them; computed here when not given). The
    document frequencies stay those of the whole set, the common practice; recomputing them per
    draw would make each draw a full rescoring. The object metrics (`object_metrics`, and CHAIR
    with `annotations`) are recomputed as micro-averages over the drawn photos. BLEU gets no
    interval: it is a corpus-level statistic (clipped n-gram counts and the brevity penalty summed
    over all photos), so each draw would need a full rescoring, 1000 BLEU runs; nor METEOR (a
    Java process) and ROUGE-L, which `caption_metrics` reports without per-image scores.

    Returns metric -> (low, high).
    """
    ids = sorted(predictions)
    if not ids:
        return {}
    if cider is None:
        cider = cider_per_image(predictions, references)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(resamples, len(ids)))  # (R, N) photo indices
    tail = 100 * (1 - confidence) / 2

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, [tail, 100 - tail])
        return float(low), float(high)

    intervals = {"CIDEr-D": interval(np.asarray([cider[i] for i in ids])[draws].mean(axis=1))}
    counts = _object_counts(predictions, references, annotations, min_refs)
    for name, (numerator, denominator) in _OBJECT_RATIOS.items():
        if denominator not in counts:
            continue
        top, bottom = counts[numerator][draws].sum(axis=1), counts[denominator][draws].sum(axis=1)
        intervals[name] = interval(np.divide(top, bottom, out=np.zeros(resamples), where=bottom > 0))
    return intervals
