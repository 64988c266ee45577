"""Caption data sets in the formats people have, read into one representation.

    Flickr8k/30k  `captions.txt` (CSV image,caption) or `Flickr8k.token.txt` (image#n<TAB>caption),
                  with the official split lists (`train.txt`, `Flickr_8k.trainImages.txt`, ...)
    COCO          `captions_train2017.json` and friends
    Karpathy      `dataset_coco.json` / `dataset_flickr8k.json` / `dataset_flickr30k.json`
    JSONL         one `{"image": path, "captions": [...], "split": "train"}` per line

`load_dataset(spec)` returns `list[Sample]` for one split; images that are missing or unreadable
are counted, named in a warning and dropped, and the load fails only past a threshold.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FORMATS = ("flickr", "coco", "karpathy", "jsonl")


@dataclass
class Sample:
    image: Path
    captions: list[str]
    image_id: str = ""  # stable id for results files (COCO's numeric id where there is one)


@dataclass
class DataSpec:
    """Where a data set is and how to read it. `path` is the annotation file (or a folder holding
    the usual files); `images` the image folder when it is not the usual one.

    Training and validation take a list of these. `weight` is, for a training set, how many times
    each of its photos is seen per epoch (1.5: every photo once and a random half again); for a
    validation set, its share of the model-selection score. `split` overrides the run's split
    name for this set (Flickr8k's "dev" is Karpathy's "val")."""

    format: str
    path: str
    name: str = ""  # in metric names and logs; default: the data set's folder name
    weight: float = 1.0
    split: str | None = None
    images: str | None = None
    split_file: str | None = None  # flickr: a list of image names for this split
    max_missing_fraction: float = 0.01
    limit: int | None = None  # first N images only (quick experiments)
    extra: dict = field(default_factory=dict)


    def __post_init__(self) -> None:
        if not self.weight >= 0:
            raise ValueError(f"data set weight must be at least 0, not {self.weight}")

    @property
    def label(self) -> str:
        """`name`, or the data set's folder name."""
        path = Path(self.path)
        return self.name or (path.name if path.is_dir() or not path.suffix else path.parent.name)


class DataError(ValueError):
    pass


def load_dataset(spec: DataSpec, split: str) -> list[Sample]:
    split = spec.split or split
    if spec.format not in FORMATS:
        raise DataError(f"unknown data format {spec.format!r}; expected one of {FORMATS}")
    reader = {"flickr": _flickr, "coco": _coco, "karpathy": _karpathy, "jsonl": _jsonl}[spec.format]
    samples = reader(spec, split)
    if spec.limit is not None:
        samples = samples[: spec.limit]
    return check_images(samples, spec.max_missing_fraction, what=f"{spec.format} {split}")


def check_images(samples: list[Sample], max_missing_fraction: float, *, what: str) -> list[Sample]:
    """Drop samples whose image file is missing or empty; fail past the allowed fraction."""
    if not samples:
        raise DataError(f"{what}: no samples found")
    present, missing = [], []
    for sample in samples:
        try:
            ok = sample.image.stat().st_size > 0
        except OSError:
            ok = False
        (present if ok else missing).append(sample)
    if missing:
        names = ", ".join(str(s.image) for s in missing[:5]) + (" ..." if len(missing) > 5 else "")
        log.warning("%s: %d of %d images missing or empty, skipped: %s", what, len(missing), len(samples), names)
        if len(missing) > max_missing_fraction * len(samples):
            raise DataError(
                f"{what}: {len(missing)} of {len(samples)} images are missing (allowed: "
                f"{max_missing_fraction:.1%}); check the image folder, or raise data.max_missing_fraction"
            )
    return present


# -- Flickr8k / Flickr30k -----------------------------------------------------------------------

def _flickr(spec: DataSpec, split: str) -> list[Sample]:
    root = Path(spec.path)
    annotations = root
    if root.is_dir():
        candidates = ["captions.txt", "Flickr8k.token.txt", "results_20130124.token", "Flickr30k.token.txt"]
        annotations = next((root / c for c in candidates if (root / c).is_file()), root / candidates[0])
    if not annotations.is_file():
        raise DataError(f"no Flickr caption file at {spec.path}")
    folder = Path(spec.images) if spec.images else _first_dir(annotations.parent, ["images", "Images", "Flicker8k_Dataset", "flickr30k_images"])
    captions: OrderedDict[str, list[str]] = OrderedDict()
    with open(annotations, newline="", encoding="utf-8") as handle:
        first = handle.readline()
        handle.seek(0)
        if first.strip().lower() == "image,caption":  # today's CSV layout
            rows = csv.reader(handle)
            next(rows)
            pairs = ((row[0], ",".join(row[1:])) for row in rows if len(row) >= 2)
        else:  # original token file: "name.jpg#0<TAB>caption"
            pairs = (line.rstrip("\n").split("\t", 1) for line in handle if "\t" in line)
            pairs = ((name.split("#")[0], text) for name, text in pairs)
        for name, text in pairs:
            captions.setdefault(name.strip(), []).append(text.strip())
    names = list(captions)
    split_file = spec.split_file or _flickr_split_file(annotations.parent, split)
    if split_file:
        wanted = [line.strip() for line in open(split_file, encoding="utf-8") if line.strip()]
        names = [n for n in wanted if n in captions]
        unknown = len(wanted) - len(names)
        if unknown:
            log.warning("%s: %d names in %s have no captions", spec.path, unknown, split_file)
    elif split != "all":
        raise DataError(f"no split list for split {split!r} under {annotations.parent}; pass data.split_file")
    return [Sample(folder / n, captions[n], image_id=n) for n in names]


def _flickr_split_file(root: Path, split: str) -> str | None:
    names = {
        "train": ["splits/train.txt", "Flickr_8k.trainImages.txt", "train.txt"],
        "dev": ["splits/dev.txt", "Flickr_8k.devImages.txt", "dev.txt", "splits/val.txt", "val.txt"],
        "val": ["splits/dev.txt", "Flickr_8k.devImages.txt", "splits/val.txt", "val.txt", "dev.txt"],
        "test": ["splits/test.txt", "Flickr_8k.testImages.txt", "test.txt"],
    }.get(split, [])
    return next((str(root / n) for n in names if (root / n).is_file()), None)


def _first_dir(root: Path, names: list[str]) -> Path:
    return next((root / n for n in names if (root / n).is_dir()), root)


# -- COCO ---------------------------------------------------------------------------------------

def _coco(spec: DataSpec, split: str) -> list[Sample]:
    path = Path(spec.path)
    if path.is_dir():
        path = path / "annotations" / f"captions_{split}2017.json"
    if not path.is_file():
        raise DataError(f"no COCO caption file at {path}")
    data = json.loads(path.read_text(encoding="utf-8"))
    folder = Path(spec.images) if spec.images else path.parent.parent / path.stem.replace("captions_", "")
    by_id: OrderedDict[int, list[str]] = OrderedDict((img["id"], []) for img in data["images"])
    for ann in data["annotations"]:
        by_id.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    return [Sample(folder / files[i], caps, image_id=str(i)) for i, caps in by_id.items() if caps and i in files]


# -- Karpathy splits ------------------------------------------------------------------------------

def _karpathy(spec: DataSpec, split: str) -> list[Sample]:
    path = Path(spec.path)
    data = json.loads(path.read_text(encoding="utf-8"))
    folder = Path(spec.images) if spec.images else path.parent
    wanted = {"train": {"train", "restval"}, "dev": {"val"}, "val": {"val"}, "test": {"test"}}.get(split, {split})
    samples = []
    for image in data["images"]:
        if image.get("split") not in wanted:
            continue
        relative = Path(image.get("filepath", "")) / image["filename"]
        captions = [s.get("raw") or " ".join(s["tokens"]) for s in image["sentences"]]
        image_id = str(image.get("cocoid", image.get("imgid", image["filename"])))
        samples.append(Sample(folder / relative, captions, image_id=image_id))
    return samples


# -- JSONL --------------------------------------------------------------------------------------

def _jsonl(spec: DataSpec, split: str) -> list[Sample]:
    path = Path(spec.path)
    folder = Path(spec.images) if spec.images else path.parent
    samples = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                image, captions = record["image"], record["captions"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise DataError(f"{path}:{number}: expected {{\"image\": ..., \"captions\": [...]}} ({error})") from error
            if record.get("split", split) != split and split != "all":
                continue
            image_path = Path(image) if os.path.isabs(image) else folder / image
            samples.append(Sample(image_path, [str(c) for c in captions], image_id=str(record.get("id", image))))
    return samples
