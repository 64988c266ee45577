"""`captioner evaluate CHECKPOINT --data ... --split dev`: decode a split with the shipped model
(the same loading path as the library), print the metrics table and write the captions as a COCO
results JSON (`[{"image_id", "caption"}]`) that the coco-caption toolkit reads."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from captioner.api import Captioner
from captioner.decoding import DecodeConfig

from . import features
from .data import DataSpec, load_dataset
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
) -> dict[str, Any]:
    samples = load_dataset(spec, split)
    cache = features.build_or_load(model.encoder, model.preprocessing, [s.image for s in samples], cache_dir,
                                   progress=progress)
    usable = [s for s in samples if cache.usable(s.image)]

    def regions_of(indices: list[int]) -> torch.Tensor:
        return cache.regions([usable[i].image for i in indices]).to(model.device)

    metrics, predictions = evaluate(model.decoder, model.vocabulary, regions_of, usable, decode,
                                    meteor=meteor, progress=progress)
    if results_path is not None:
        results = [{"image_id": _coco_id(i), "caption": c} for i, c in predictions.items()]
        Path(results_path).write_text(json.dumps(results, indent=1))
    return {"images": len(usable), "split": split, **metrics}


def _coco_id(image_id: str) -> int | str:
    return int(image_id) if image_id.isdigit() else image_id


def format_table(metrics: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, float)]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v:.4f}" for k, v in rows)
