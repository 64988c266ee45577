"""`captioner evaluate CHECKPOINT --data ... --split dev`: decode a split with the shipped model
(the same loading path as the library), print the metrics table and write the captions as a COCO
results JSON (`[{"image_id", "caption"}]`) that the coco-caption toolkit reads.

Besides the caption metrics: object recall and precision against the references, CHAIR
hallucination rates where the photos' object annotations are at hand (COCO's
`instances_<split>2017.json` beside the captions file, or one named), and 95% bootstrap intervals
over photos (`metrics["intervals"]`, metric -> [low, high])."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any


from captioner.api import Captioner
from captioner.decoding import DecodeConfig

from . import features
from .data import DataSpec, load_dataset
from .metrics import bootstrap_intervals, object_metrics
from .objects import load_instances
from .train import evaluate

log = logging.getLogger(__name__)


def evaluate_checkpoint(
    model: Captioner,
    spec: DataSpec,
    split: str,
    decode: DecodeConfig,
    *,
    cache_dir: str | os.PathLike = "cache/features",
    results_path: str | os.PathLike | None = None,
    meteor: bool = True,
    progress: bool = True,
    instances: str | os.PathLike | None = None,
    resamples: int = 1000,
) -> dict[str, Any]:
    """Decode and score `split`. `instances`: a COCO instances file for the CHAIR figures (by
    default, for COCO data, `instances_<split>2017.json` beside the captions file when there is
    one). `resamples`: bootstrap draws for the intervals (0: none)."""
    samples = load_dataset(spec, split)
    cache = features.build_or_load(model.encoder, model.preprocessing, [s.image for s in samples], cache_dir,
                                   progress=progress)
    usable = [s for s in samples if cache.usable(s.image)]

    tagged: list[bool] = []

    def captions_of(indices: list[int]) -> list[str]:
        """The library's own decoding of cached features: force_words and tags included."""
        regions = cache.regions([usable[i].image for i in indices]).to(model.device)
        results = model.caption_features(regions, regions.mean(dim=1), decode)
        tagged.extend(any(r.source == "tag" for r in result.required) for result in results)
        return [result.text for result in results]

    metrics, predictions = evaluate(captions_of, usable, meteor=meteor, progress=progress)
    metrics["tagged_share"] = sum(tagged) / max(len(tagged), 1)  # photos whose caption had to say a tag
    if results_path is not None:
        results = [{"image_id": _coco_id(i), "caption": c} for i, c in predictions.items()]
        Path(results_path).write_text(json.dumps(results, indent=1))
    references = {s.image_id: s.captions for s in usable}
    instances = instances if instances is not None else _instances_beside(spec, split)
    annotations = load_instances(instances) if instances is not None else None
    if annotations is not None and not any(i in annotations for i in predictions):
        log.warning("%s names none of the %d evaluated images; no CHAIR figures", instances, len(predictions))
    metrics.update(object_metrics(predictions, references, annotations=annotations))
    out: dict[str, Any] = {"images": len(usable), "split": split, **metrics}
    if resamples:
        # train.evaluate keeps only the corpus CIDEr-D, so the per-image scores take one more
        # CIDEr-D pass here (a second or two for 1000 photos).
        intervals = bootstrap_intervals(predictions, references, annotations=annotations, resamples=resamples)
        out["intervals"] = {k: [low, high] for k, (low, high) in intervals.items()}
    return out


def _instances_beside(spec: DataSpec, split: str) -> Path | None:
    """COCO's object annotations for the split, where the data set has them beside its captions."""
    if spec.format != "coco":
        return None
    captions = Path(spec.path)
    if captions.is_dir():
        captions = captions / "annotations" / f"captions_{split}2017.json"
    name = captions.name.replace("captions_", "instances_", 1) if captions.name.startswith("captions_") \
        else f"instances_{split}2017.json"
    path = captions.parent / name
    return path if path.is_file() else None


def _coco_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() else image_id


def format_table(metrics: dict[str, Any]) -> str:
    """One metric a line, with its 95% interval where there is one: `CIDEr-D  0.5390  [0.5102, 0.5671]`."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, float)]
    intervals = metrics.get("intervals", {})
    width = max(len(k) for k, _ in rows)
    lines = []
    for k, v in rows:
        line = f"{k:<{width}}  {v:.4f}"
        if k in intervals:
            low, high = intervals[k]
            line += f"  [{low:.4f}, {high:.4f}]"
        lines.append(line)
    return "\n".join(lines)
