"""`captioner caption-folder`: finding images, records, formats, exit status, gallery.

Runs the real command in-process (`captioner.cli.main`) on the tiny model; the kill/resume tests
that need a real subprocess are in test_folder_resume.py."""

from __future__ import annotations

import csv
import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

from captioner.batch.imageset import WORKER_NICENESS, ImageFileDataset, collate, pixel_loader
from captioner.batch.listing import find_images, sniff_image
from captioner.batch.records import coco_image_ids
from captioner.cli import main
from captioner.decoding import DecodeConfig
from tests.conftest import make_photo

FAST = ["--max-new-tokens", "4", "--num-beams", "2", "--precision", "fp32"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under `folder` (not following links) with its size and mtime."""
    seen = {}
    for directory, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(directory, name)
            info = path.lstat()
            seen[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return seen


@pytest.fixture
def photo_dir(tmp_path: Path) -> Path:
    """Five good photos in three formats, one in a subfolder, plus files that are not images."""
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    (folder / "b.jpg").write_bytes(make_photo(320, 240, seed=1))
    (folder / "a.png").write_bytes(make_photo(200, 300, seed=2, fmt="PNG"))
    (folder / "C.JPEG").write_bytes(make_photo(640, 480, seed=3))
    (folder / "IMG_0042").write_bytes(make_photo(300, 300, seed=4))  # no extension: sniffed
    (folder / "trip" / "d.webp").write_bytes(make_photo(256, 256, seed=5, fmt="WEBP"))
    (folder / "notes.txt").write_text("not an image")
    (folder / "README").write_text("no extension, not an image")
    (folder / ".hidden.jpg").write_bytes(make_photo(seed=6))
    return folder


def run(*args: str | os.PathLike) -> int:
    return main(["caption-folder", *map(str, args)])


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# -- finding images ------------------------------------------------------------------------------


def test_sniff_recognises_image_formats_and_rejects_others():
    for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF", "PPM"):
        assert sniff_image(make_photo(16, 16, fmt=fmt)[:32]), fmt
    for data in (b"", b"hello world", b"BM but not a bitmap header", b"%PDF-1.7\n", b"PK\x03\x04zip"):
        assert not sniff_image(data), data


def test_find_images_by_extension_and_content_sorted(photo_dir: Path):
    top = find_images(photo_dir)
    assert top.images == ["C.JPEG", "IMG_0042", "a.png", "b.jpg"]
    assert dict(top.skipped) == {".hidden.jpg": "hidden", "README": "not an image", "notes.txt": "not an image"}
    deep = find_images(photo_dir, recursive=True)
    assert deep.images == ["C.JPEG", "IMG_0042", "a.png", "b.jpg", "trip/d.webp"]
    assert find_images(photo_dir, recursive=True, glob="*.jpg").images == ["b.jpg"]  # case-insensitive name
    assert find_images(photo_dir, recursive=True, glob="*.JPEG").images == ["C.JPEG"]
    assert find_images(photo_dir, recursive=True, glob="trip/*").images == ["trip/d.webp"]


@pytest.mark.parametrize("recursive, glob", [(False, None), (True, None), (True, "*.jpg"), (True, "trip/*")])
def test_the_local_and_the_object_store_walkers_apply_one_rule(photo_dir: Path, recursive, glob):
    pytest.importorskip("pyarrow")
    from captioner.batch.ray_engine import Location, find_images_at

    (photo_dir / ".cache").mkdir()
    (photo_dir / ".cache" / "e.jpg").write_bytes(make_photo(seed=7))  # inside a hidden folder
    (photo_dir / "trip" / "f.jpg").write_text("an image's name, not its bytes")
    local = find_images(photo_dir, recursive=recursive, glob=glob)
    store = find_images_at(Location(photo_dir.as_uri()), recursive=recursive, glob=glob)  # file://, via pyarrow
    assert store.images == local.images and store.skipped == local.skipped
    assert (".cache", "hidden") in local.skipped


def test_find_images_survives_symlink_loops_fifos_and_broken_links(photo_dir: Path):
    (photo_dir / "trip" / "back").symlink_to(photo_dir, target_is_directory=True)  # a loop
    (photo_dir / "trip" / "self").symlink_to(photo_dir / "trip" / "self")  # links to itself
    (photo_dir / "gone.jpg").symlink_to(photo_dir / "missing.jpg")  # broken
    (photo_dir / "same.jpg").symlink_to(photo_dir / "b.jpg")  # a link to a file is followed
    os.mkfifo(photo_dir / "pipe.jpg")  # opening it would block forever
    found = find_images(photo_dir, recursive=True)
    assert found.images == ["C.JPEG", "IMG_0042", "a.png", "b.jpg", "gone.jpg", "same.jpg", "trip/d.webp"]
    skipped = dict(found.skipped)
    assert skipped["pipe.jpg"] == "not a regular file"
    assert "symlink loop" in skipped["trip/back"]
    assert "trip/self" in skipped


def test_coco_ids_from_trailing_digits_or_paths():
    assert coco_image_ids(["COCO_val2014_000000391895.jpg", "x/12.png"]) == {
        "COCO_val2014_000000391895.jpg": 391895, "x/12.png": 12}
    assert coco_image_ids(["a1.jpg", "b1.jpg"]) == {"a1.jpg": "a1.jpg", "b1.jpg": "b1.jpg"}  # not unique
    assert coco_image_ids(["cat.jpg"]) == {"cat.jpg": "cat.jpg"}


def test_pixel_loader_workers_decode_with_one_thread_below_the_model():
    class Threads(ImageFileDataset):
        def __getitem__(self, index):  # pixel 0: the worker's torch threads, pixel 1: its niceness
            return index, torch.tensor([torch.get_num_threads(), os.nice(0)], dtype=torch.uint8), None

    batches = list(pixel_loader(Threads(range(4), None), batch_size=2, workers=2))
    assert [b.indices for b in batches] == [[0, 1], [2, 3]]
    assert all(b.pixels[:, 0].tolist() == [1, 1] for b in batches)
    # The model's process keeps the cores while both want them; decoding fills the gaps.
    assert all(b.pixels[:, 1].tolist() == [min(os.nice(0) + WORKER_NICENESS, 19)] * 2 for b in batches)


def test_collate_keeps_failures_out_of_the_pixels():
    batch = collate([(0, torch.zeros(3, 4, 4, dtype=torch.uint8), None), (1, None, "bad"), (2, torch.ones(3, 4, 4, dtype=torch.uint8), None)])
    assert batch.indices == [0, 2] and batch.failures == [(1, "bad")] and batch.pixels.shape == (2, 3, 4, 4)


# -- the command ---------------------------------------------------------------------------------


def test_captions_every_image_in_order_and_matches_the_library(photo_dir, tiny_checkpoint, tiny_captioner, tmp_path, capsys):
    before = snapshot(photo_dir)
    out = tmp_path / "out" / "captions.jsonl"
    assert run(photo_dir, "-o", out, "--recursive", "--checkpoint", tiny_checkpoint, "--batch-size", "8",
               "--workers", "2", *FAST) == 0
    records = read_jsonl(out)
    paths = ["C.JPEG", "IMG_0042", "a.png", "b.jpg", "trip/d.webp"]
    assert [r["path"] for r in records] == paths
    pixels = torch.stack([tiny_captioner.preprocessing.load(photo_dir / p) for p in paths])
    expected = tiny_captioner.caption_pixels(pixels, DecodeConfig(max_new_tokens=4, num_beams=2))
    assert [r["caption"] for r in records] == [e.text for e in expected]
    assert [r["score"] for r in records] == pytest.approx([e.score for e in expected], abs=1e-5)
    assert snapshot(photo_dir) == before  # nothing written into DIR
    err = capsys.readouterr().err
    assert "img/s" in err  # the progress bar
    assert re.search(r"captioned 5, failed 0, skipped 3 \(not images, or hidden\); [\d.]+ s, [\d.]+ images/s", err)


def test_a_record_is_the_cli_json_line_of_the_same_image(photo_dir, tiny_checkpoint, tmp_path, capsys):
    options = [*FAST, "--num-return-sequences", "2", "--force-words", "cat", "--checkpoint", tiny_checkpoint]
    assert run(photo_dir, "-o", tmp_path / "out.jsonl", *options) == 0
    [record] = [r for r in read_jsonl(tmp_path / "out.jsonl") if r["path"] == "b.jpg"]
    capsys.readouterr()
    assert main(["caption", str(photo_dir / "b.jpg"), "--json", *options]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line.keys() == record.keys() and line["path"] == str(photo_dir / "b.jpg")
    assert [s.keys() for s in line["sequences"]] == [s.keys() for s in record["sequences"]]
    assert [s["text"] for s in line["sequences"]] == [s["text"] for s in record["sequences"]]
    assert line["score"] == pytest.approx(record["score"], abs=1e-4)
    assert line["required"] == record["required"] and line["required"][0]["word"] == "cat"


def test_cli_json_carries_hidden_states_only_when_asked(photo_dir, tiny_checkpoint, capsys):
    """caption --json --output-hidden-states: h, c and the four gates per word (then <eos>), (T, D)."""
    options = [*FAST, "--checkpoint", tiny_checkpoint]
    assert main(["caption", str(photo_dir / "b.jpg"), "--json", *options]) == 0
    assert "hidden_states" not in json.loads(capsys.readouterr().out)["sequences"][0]
    assert main(["caption", str(photo_dir / "b.jpg"), "--json", "--output-hidden-states", *options]) == 0
    sequence = json.loads(capsys.readouterr().out)["sequences"][0]
    steps = len(sequence["words"]) + int(sequence["finished"])
    states = sequence["hidden_states"]
    assert set(states) == {"h", "c", "gates"} and set(states["gates"]) == {"i", "f", "g", "o"}
    for matrix in (states["h"], states["c"], *states["gates"].values()):
        assert len(matrix) == steps and len({len(row) for row in matrix}) == 1


def test_unreadable_files_become_error_records_and_the_run_goes_on(tmp_path, tiny_checkpoint, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(make_photo(seed=1))
    (folder / "truncated.jpg").write_bytes(make_photo(seed=2)[:400])
    (folder / "text.jpg").write_text("this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "link.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "zlast.jpg").write_bytes(make_photo(seed=3))
    out = tmp_path / "out.jsonl"
    assert run(folder, "-o", out, "--checkpoint", tiny_checkpoint, "--batch-size", "2", "--workers", "1", *FAST) == 0
    records = {r["path"]: r for r in read_jsonl(out)}
    assert list(records) == ["empty.png", "good.jpg", "link.jpg", "text.jpg", "truncated.jpg", "zlast.jpg"]
    assert set(records["good.jpg"]) == {"path", "caption", "score", "sequences", "required", "excluded"}
    assert records["zlast.jpg"]["caption"]
    for name in ("empty.png", "link.jpg", "text.jpg", "truncated.jpg"):
        assert set(records[name]) == {"path", "error"} and records[name]["error"], name
        assert str(folder) not in records[name]["error"]  # the record names the file already
    assert "not an image" in records["text.jpg"]["error"]
    assert "No such file" in records["link.jpg"]["error"]
    err = capsys.readouterr().err
    assert "captioned 2, failed 4" in err and "truncated.jpg:" in err


def test_an_unexpected_decoder_error_is_that_files_record_on_either_engine(photo_dir, tiny_checkpoint, tmp_path,
                                                                           monkeypatch):
    import numpy as np

    from captioner.batch.ray_engine import decode_images
    from captioner.preprocessing import Preprocessing

    load = Preprocessing.load

    def codec_bug(self, source, **kwargs):
        if str(source).endswith("b.jpg"):
            raise RuntimeError("codec bug")
        return load(self, source, **kwargs)

    monkeypatch.setattr(Preprocessing, "load", codec_bug)
    assert run(photo_dir, "-o", tmp_path / "out.jsonl", "--checkpoint", tiny_checkpoint, "--workers", "0", *FAST) == 0
    records = {r["path"]: r for r in read_jsonl(tmp_path / "out.jsonl")}
    reason = "cannot decode (RuntimeError: codec bug)"
    assert records["b.jpg"] == {"path": "b.jpg", "error": reason} and "caption" in records["a.png"]
    # the Ray engine's decoding task runs the same guard
    batch = {"index": np.array([0, 1]), "path": np.array(["a.png", "b.jpg"], dtype=object)}
    decoded = decode_images(batch, source=str(photo_dir), size=224,
                            preprocessing=Preprocessing(size=224, resize="squash").to_dict())
    assert list(decoded["error"]) == ["", reason]


def test_csv_and_coco_outputs(photo_dir, tiny_checkpoint, tmp_path):
    (photo_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    csv_path = tmp_path / "captions.csv"
    assert run(photo_dir, "-o", csv_path, "--checkpoint", tiny_checkpoint, "--workers", "0", "--quiet", *FAST) == 0
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["path"] for r in rows] == ["C.JPEG", "IMG_0042", "a.png", "b.jpg", "broken.jpg"]
    assert rows[0]["caption"] and float(rows[0]["score"]) < 0 and rows[0]["error"] == ""
    assert rows[4]["caption"] == "" and rows[4]["error"]

    coco_path = tmp_path / "results.json"
    assert run(photo_dir, "-o", coco_path, "--checkpoint", tiny_checkpoint, "--workers", "0", "--quiet", *FAST) == 0
    results = json.loads(coco_path.read_text())
    assert [r["file_name"] for r in results] == ["C.JPEG", "IMG_0042", "a.png", "b.jpg"]
    assert all(isinstance(r["caption"], str) and r["caption"] for r in results)
    assert [r["image_id"] for r in results] == ["C.JPEG", "IMG_0042", "a.png", "b.jpg"]  # no unique digits
    journal = read_jsonl(Path(str(coco_path) + ".records.jsonl"))
    assert [r["path"] for r in journal if "error" in r] == ["broken.jpg"]


def test_coco_results_load_in_the_coco_toolkit(tmp_path, tiny_checkpoint):
    coco = pytest.importorskip("pycocotools.coco")
    folder = tmp_path / "val"
    folder.mkdir()
    for image_id in (42, 391895):
        (folder / f"COCO_val2014_{image_id:012d}.jpg").write_bytes(make_photo(seed=image_id % 7))
    out = tmp_path / "results.json"
    assert run(folder, "-o", out, "--format", "coco", "--checkpoint", tiny_checkpoint, "--quiet", *FAST) == 0
    ground_truth = coco.COCO()
    ground_truth.dataset = {"images": [{"id": 42}, {"id": 391895}],
                            "annotations": [{"id": 1, "image_id": 42, "caption": "a dog"},
                                            {"id": 2, "image_id": 391895, "caption": "a cat"}]}
    ground_truth.createIndex()
    results = ground_truth.loadRes(str(out))
    assert sorted(results.getImgIds()) == [42, 391895]


def test_quiet_prints_nothing(photo_dir, tiny_checkpoint, tmp_path, capsys):
    assert run(photo_dir, "-o", tmp_path / "o.jsonl", "--checkpoint", tiny_checkpoint, "--quiet", "--workers", "0", *FAST) == 0
    assert capsys.readouterr() == ("", "")


def test_rerun_skips_done_images_and_overwrite_starts_again(photo_dir, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    common = ["--checkpoint", tiny_checkpoint, "--workers", "0", *FAST]
    assert run(photo_dir, "-o", out, *common) == 0
    first = out.read_bytes()
    (photo_dir / "z_new.jpg").write_bytes(make_photo(seed=9))
    assert run(photo_dir, "-o", out, *common) == 0
    assert out.read_bytes().startswith(first)
    assert [r["path"] for r in read_jsonl(out)][-1] == "z_new.jpg" and len(read_jsonl(out)) == 5
    assert "captioned 1, failed 0, skipped 3 (not images, or hidden), 4 already in OUT" in capsys.readouterr().err
    assert run(photo_dir, "-o", out, *common) == 0  # nothing left to do is not a failure
    assert len(read_jsonl(out)) == 5
    assert run(photo_dir, "-o", out, "--overwrite", *common) == 0
    assert [r["path"] for r in read_jsonl(out)] == ["C.JPEG", "IMG_0042", "a.png", "b.jpg", "z_new.jpg"]


def test_exit_status(tmp_path, tiny_checkpoint, photo_dir, capsys):
    common = ["--checkpoint", tiny_checkpoint, "--workers", "0", "--quiet", *FAST]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hi")
    assert run(empty, "-o", tmp_path / "e.jsonl", *common) == 1
    assert "no images" in capsys.readouterr().err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    assert run(broken, "-o", tmp_path / "b.jsonl", *common) == 1
    assert read_jsonl(tmp_path / "b.jsonl")[0]["path"] == "x.jpg"
    assert "no image could be captioned" in capsys.readouterr().err

    before = snapshot(photo_dir)
    assert run(photo_dir, "-o", photo_dir / "trip" / "out.jsonl", *common) == 2  # OUT inside DIR
    assert run(photo_dir, "-o", tmp_path / "ok.jsonl", "--html", photo_dir / "g.html", *common) == 2
    assert snapshot(photo_dir) == before
    assert "inside" in capsys.readouterr().err

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert run(photo_dir, "-o", blocker / "out.jsonl", *common) == 2  # cannot be written
    assert "cannot write" in capsys.readouterr().err

    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("precious data\n")
    assert run(photo_dir, "-o", foreign, *common) == 2  # never appends to someone else's file
    assert foreign.read_text() == "precious data\n"


def test_html_gallery_links_every_image_and_sorts_by_score(photo_dir, tiny_checkpoint, tmp_path):
    (photo_dir / "bad.jpg").write_text("nope")
    page = tmp_path / "site" / "gallery.html"
    out = tmp_path / "o.jsonl"
    assert run(photo_dir, "-o", out, "--recursive", "--html", page, "--checkpoint", tiny_checkpoint,
               "--workers", "0", "--quiet", *FAST) == 0
    records = {r["path"]: r for r in read_jsonl(out)}

    class Cards(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cards, self.sort_options = [], []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            if tag == "figure":
                self.cards.append({"path": attrs["data-path"], "score": attrs["data-score"], "class": attrs["class"]})
            elif tag == "img":
                self.cards[-1]["src"] = attrs["src"]
            elif tag == "option":
                self.sort_options.append(attrs["value"])

    parser = Cards()
    parser.feed(page.read_text())
    assert [c["path"] for c in parser.cards] == sorted(records)
    for card in parser.cards:
        assert (page.parent / unquote(card["src"])).resolve() == (photo_dir / card["path"]).resolve()
        record = records[card["path"]]
        if "caption" in record:
            assert float(card["score"]) == pytest.approx(record["score"])
        else:
            assert "failed" in card["class"] and card["score"] == ""
    assert {"score-desc", "score-asc", "path"} <= set(parser.sort_options)
    assert "score(b) - score(a)" in page.read_text()  # best first is the default order
