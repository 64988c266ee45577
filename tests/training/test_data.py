import json
import logging

import pytest

from tests.conftest import make_photo
from training.data import DataError, DataSpec, load_dataset


def test_flickr_csv_with_official_splits(flickr_dir):
    train = load_dataset(DataSpec(format="flickr", path=str(flickr_dir)), "train")
    dev = load_dataset(DataSpec(format="flickr", path=str(flickr_dir)), "dev")
    assert len(train) == 8 and len(dev) == 4 and len(dev[0].captions) == 3
    assert train[0].image == flickr_dir / "images" / "1000_img.jpg"
    assert train[0].captions == ["A dog runs on the grass .", "A dog on the grass ."]
    assert not {s.image_id for s in train} & {s.image_id for s in dev}


def test_flickr_original_token_file(tmp_path, flickr_dir):
    token = tmp_path / "Flickr8k.token.txt"
    token.write_text("1000_img.jpg#0\tA dog runs .\n1000_img.jpg#1\tA brown dog .\n1001_img.jpg#0\tA cat .\n")
    split = tmp_path / "list.txt"
    split.write_text("1000_img.jpg\n1001_img.jpg\n")
    samples = load_dataset(DataSpec(format="flickr", path=str(token), images=str(flickr_dir / "images"),
                                    split_file=str(split)), "train")
    assert [s.captions for s in samples] == [["A dog runs .", "A brown dog ."], ["A cat ."]]


def test_coco_captions_json(coco_file):
    samples = load_dataset(DataSpec(format="coco", path=str(coco_file)), "train")
    assert len(samples) == 3
    assert samples[0].image_id == "100" and samples[0].image.name == "000000000000.jpg"
    assert samples[2].captions == ["a man rides a bike in the park", "a man on a bike"]


def test_karpathy_json_splits(tmp_path):
    (tmp_path / "val2014").mkdir()
    images = []
    for i, split in enumerate(["train", "restval", "val", "test"]):
        (tmp_path / "val2014" / f"{i}.jpg").write_bytes(make_photo(32, 32, seed=i))
        images.append({"filepath": "val2014", "filename": f"{i}.jpg", "split": split, "cocoid": i,
                       "sentences": [{"raw": f"caption {i}", "tokens": ["caption", str(i)]}]})
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps({"images": images}))
    train = load_dataset(DataSpec(format="karpathy", path=str(path)), "train")
    assert [s.image_id for s in train] == ["0", "1"]  # restval joins train, as usual
    assert [s.captions for s in load_dataset(DataSpec(format="karpathy", path=str(path)), "test")] == [["caption 3"]]


def test_jsonl(tmp_path):
    (tmp_path / "a.jpg").write_bytes(make_photo(32, 32))
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "captions": ["one", "two"], "split": "train"}) + "\n\n")
    samples = load_dataset(DataSpec(format="jsonl", path=str(path)), "train")
    assert samples[0].image == tmp_path / "a.jpg" and samples[0].captions == ["one", "two"]
    path.write_text('{"image": "a.jpg"}\n')
    with pytest.raises(DataError, match="data.jsonl:1"):
        load_dataset(DataSpec(format="jsonl", path=str(path)), "train")


def test_missing_images_are_named_skipped_and_bounded(tmp_path, caplog):
    for i in range(10):
        if i != 3:
            (tmp_path / f"{i}.jpg").write_bytes(make_photo(16, 16, seed=i))
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"image": f"{i}.jpg", "captions": ["x"]}) + "\n" for i in range(10)))
    with caplog.at_level(logging.WARNING):
        samples = load_dataset(DataSpec(format="jsonl", path=str(path), max_missing_fraction=0.2), "train")
    assert len(samples) == 9 and "3.jpg" in caplog.text
    with pytest.raises(DataError, match="1 of 10 images are missing"):
        load_dataset(DataSpec(format="jsonl", path=str(path), max_missing_fraction=0.05), "train")
