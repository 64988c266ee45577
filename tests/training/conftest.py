"""A tiny captioned photo set in each supported format, made on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import make_photo

CAPTIONS = [
    ["a dog runs on the grass", "a dog on the grass"],
    ["a cat sits on the sofa", "the cat on a sofa"],
    ["a man rides a bike in the park", "a man on a bike"],
    ["a red ball on the grass", "the red ball"],
]


@pytest.fixture(scope="session")
def flickr_dir(tmp_path_factory) -> Path:
    """Flickr8k layout: images/, captions.txt (CSV), splits/{train,dev}.txt; 12 images."""
    root = tmp_path_factory.mktemp("flickr")
    (root / "images").mkdir()
    (root / "splits").mkdir()
    lines = ["image,caption"]
    names = []
    for i in range(12):
        name = f"{1000 + i}_img.jpg"
        names.append(name)
        (root / "images" / name).write_bytes(make_photo(160, 120, seed=i))
        for caption in CAPTIONS[i % 4] + (["a zebra on the grass"] if i >= 8 else []):  # dev-only word
            lines.append(f"{name},{caption.capitalize()} .")
    (root / "captions.txt").write_text("\n".join(lines) + "\n")
    (root / "splits" / "train.txt").write_text("\n".join(names[:8]) + "\n")
    (root / "splits" / "dev.txt").write_text("\n".join(names[8:]) + "\n")
    return root


def tiny_train_overrides(flickr_dir: Path, out_dir: Path, **extra) -> list[str]:
    settings = {
        "data.train.path": str(flickr_dir), "data.val.path": str(flickr_dir),
        "data.cache_dir": str(out_dir.parent / "cache"), "data.workers": 0, "data.captions_per_image": 2,
        "model.min_word_count": 1, "model.decoder.embed_dim": 16, "model.decoder.hidden_dim": 32,
        "model.decoder.memory_dim": 24, "model.decoder.attention_dim": 16, "model.decoder.dropout": 0.2,
        "optim.epochs": 3, "optim.batch_images": 4, "optim.warmup_steps": 2, "optim.lr": 0.01,
        "eval.meteor": False, "eval.patience": 0, "eval.decode.num_beams": 2,
        "run.out_dir": str(out_dir), "run.progress": False, "run.threads": 1, "run.checkpoint_every_steps": 1,
    }
    settings.update(extra)
    return [f"--{k}={v}" for k, v in settings.items()]


@pytest.fixture(scope="session")
def coco_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "train2017").mkdir()
    (root / "annotations").mkdir()
    images, annotations = [], []
    for i in range(3):
        name = f"{i:012d}.jpg"
        (root / "train2017" / name).write_bytes(make_photo(64, 48, seed=i))
        images.append({"id": 100 + i, "file_name": name, "width": 64, "height": 48})
        for j, caption in enumerate(CAPTIONS[i]):
            annotations.append({"id": 1000 + 10 * i + j, "image_id": 100 + i, "caption": caption})
    path = root / "annotations" / "captions_train2017.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return path
