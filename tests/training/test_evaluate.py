"""`evaluate_checkpoint` and `captioner evaluate` on a tiny COCO-layout set: real encoder, real
decoding, object and CHAIR figures, bootstrap intervals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from captioner.cli import main as cli_main
from captioner.decoding import DecodeConfig
from tests.conftest import make_photo
from training.data import DataSpec
from training.evaluate import evaluate_checkpoint, format_table

CAPTIONS = [["a dog runs on the grass", "a dog on the grass", "the dog in a park"],
            ["a cat sits on the sofa", "the cat on a sofa", "a cat on a couch"],
            ["a man rides a bike in the park", "a man on a bike", "a person on a bicycle"],
            ["a red ball on the grass", "the red ball", "a ball and a dog"]]
OBJECTS = [["dog"], ["cat", "couch"], ["person", "bicycle"], ["sports ball", "dog"]]
CATEGORIES = ["person", "bicycle", "cat", "dog", "sports ball", "couch"]


@pytest.fixture
def coco_root(tmp_path) -> Path:
    """COCO layout with captions and instances for 4 photos."""
    (tmp_path / "train2017").mkdir()
    (tmp_path / "annotations").mkdir()
    images, captions, instances = [], [], []
    for i, (caps, objects) in enumerate(zip(CAPTIONS, OBJECTS)):
        name = f"{i:012d}.jpg"
        (tmp_path / "train2017" / name).write_bytes(make_photo(64, 48, seed=i))
        images.append({"id": 100 + i, "file_name": name, "width": 64, "height": 48})
        captions += [{"id": 10 * i + j, "image_id": 100 + i, "caption": c} for j, c in enumerate(caps)]
        instances += [{"id": 10 * i + j, "image_id": 100 + i, "category_id": CATEGORIES.index(o) + 1}
                      for j, o in enumerate(objects)]
    categories = [{"id": k + 1, "name": name} for k, name in enumerate(CATEGORIES)]
    (tmp_path / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"images": images, "annotations": captions}))
    (tmp_path / "annotations" / "instances_train2017.json").write_text(
        json.dumps({"images": images, "annotations": instances, "categories": categories}))
    return tmp_path


def test_evaluate_checkpoint_adds_object_figures_chair_and_intervals(tiny_captioner, coco_root, tmp_path):
    metrics = evaluate_checkpoint(tiny_captioner, DataSpec(format="coco", path=str(coco_root)), "train",
                                  DecodeConfig(max_new_tokens=6), cache_dir=tmp_path / "cache", meteor=False,
                                  progress=False, resamples=200)
    assert metrics["images"] == 4 and "CIDEr-D" in metrics and "BLEU-4" in metrics
    for name in ("object_recall", "object_precision", "CHAIR_i", "CHAIR_s", "annotation_recall"):
        assert 0.0 <= metrics[name] <= 1.0, name
    intervals = metrics["intervals"]
    assert set(intervals) == {"CIDEr-D", "object_recall", "object_precision", "object_scene_recall", "object_scene_precision",
                              "CHAIR_i", "CHAIR_s", "annotation_recall"}
    for name, (low, high) in intervals.items():
        assert low <= metrics[name] <= high, name
    assert json.loads(json.dumps(metrics)) == metrics  # the CLI's --json output

    table = format_table(metrics)
    low, high = intervals["CIDEr-D"]
    line = next(line for line in table.splitlines() if line.startswith("CIDEr-D "))
    assert line.split() == ["CIDEr-D", f"{metrics['CIDEr-D']:.4f}", f"[{low:.4f},", f"{high:.4f}]"]
    assert any(line.startswith("BLEU-4 ") and "[" not in line for line in table.splitlines())


def test_evaluate_command_takes_an_instances_file_and_prints_the_intervals(tiny_checkpoint, coco_root, tmp_path,
                                                                          capsys):
    captions = coco_root / "annotations" / "captions_train2017.json"
    elsewhere = tmp_path / "objects.json"
    (coco_root / "annotations" / "instances_train2017.json").rename(elsewhere)
    common = ["evaluate", tiny_checkpoint, "--data", str(captions), "--format", "coco", "--split", "train",
              "--no-meteor", "--cache-dir", str(tmp_path / "cache"), "--max-new-tokens", "6", "--bootstrap", "100"]
    assert cli_main([*common, "--json"]) == 0
    without = json.loads(capsys.readouterr().out)
    assert "object_recall" in without and "CHAIR_i" not in without  # no instances file beside the captions

    assert cli_main([*common, "--json", "--instances", str(elsewhere)]) == 0
    with_instances = json.loads(capsys.readouterr().out)
    assert "CHAIR_i" in with_instances and "CHAIR_i" in with_instances["intervals"]
    assert with_instances["CIDEr-D"] == without["CIDEr-D"]

    assert cli_main([*common, "--instances", str(elsewhere)]) == 0
    table = capsys.readouterr().out
    assert any(line.startswith("CHAIR_s ") and line.rstrip().endswith("]") for line in table.splitlines())
