"""`captioner caption-folder --engine ray` on a local Ray (`ray.init` with 2 CPUs, one for the
module): the same records, formats and resume rules as the local engine, local paths and URIs.

The kill tests (an actor, the whole job) and the two-node cluster are in
test_folder_ray_cluster.py. Ray is optional: without it these tests skip, saying what to
install (under CI=true they fail), except the ones about running without it."""

from __future__ import annotations

import builtins
import csv
import io
import json
import logging
import re
import secrets
import shutil
import sys
from pathlib import Path

import pytest

from captioner.batch.storage import STORES
from captioner.cli import main
from tests.captioner.test_folder import snapshot
from tests.conftest import make_photo, require_module

FAST = ["--max-new-tokens", "4", "--num-beams", "2", "--batch-size", "2", "--precision", "fp32"]
INSTALL = "pip install 'captioner[ray]'"
ROOT = Path(__file__).resolve().parents[2]


def loopback_ray_env(mp: pytest.MonkeyPatch) -> None:
    """Ray on the loopback interface only, with a token of its own (nothing in ~/.ray)."""
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setenv("RAY_AUTH_MODE", "token")
    mp.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="module")
def local_ray():
    """One Ray for the module: `ray.init` with 2 CPUs; the command finds it initialised and uses it."""
    with pytest.MonkeyPatch.context() as mp:
        loopback_ray_env(mp)
        ray = require_module("ray", install=INSTALL)
        require_module("ray.data", install=INSTALL)
        from ray._private import ray_constants

        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)  # in case ray was imported earlier
        ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 << 20,
                 log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Photos in three formats (one in a subfolder) and files that cannot be read."""
    folder = tmp_path_factory.mktemp("ray") / "photos"
    (folder / "trip").mkdir(parents=True)
    for i in range(5):
        (folder / f"p{i}.jpg").write_bytes(make_photo(160 + 16 * i, 120, seed=i))
    (folder / "a.png").write_bytes(make_photo(120, 160, seed=7, fmt="PNG"))
    (folder / "IMG_0042").write_bytes(make_photo(seed=8))  # no extension: sniffed
    (folder / "trip" / "d.webp").write_bytes(make_photo(seed=9, fmt="WEBP"))
    (folder / "truncated.jpg").write_bytes(make_photo(seed=10)[:400])
    (folder / "text.jpg").write_text("this is not a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "link.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.jpg").write_bytes(make_photo(seed=11))
    return folder


def caption(source, out, checkpoint, *extra, engine="ray") -> int:
    engine_args = ["--engine", "ray", "--shard-size", "3"] if engine == "ray" else ["--workers", "0"]
    return main(["caption-folder", str(source), "-o", str(out), "--checkpoint", checkpoint, *FAST,
                 *engine_args, *map(str, extra)])


def read_jsonl(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """One record per image in the same order with the same fields; the same captions, and scores
    equal up to the last printed digit (batches of other sizes add in another order)."""
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    for g, e in zip(got, expected):
        assert set(g) == set(e), g["path"]
        assert g.get("caption") == e.get("caption") and g.get("error") == e.get("error"), g["path"]
        assert g.get("score", 0.0) == pytest.approx(e.get("score", 0.0), abs=1e-5)


def committed(out: Path) -> dict[str, bytes]:
    shards = Path(str(out) + ".shards")
    return {p.name: p.read_bytes() for p in sorted(shards.iterdir())}


# -- without Ray -------------------------------------------------------------------------------------


def test_without_ray_the_command_says_what_to_install(photos, tiny_checkpoint, tmp_path, monkeypatch, capsys):
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", raising=False)  # the command may set it
    monkeypatch.setattr(builtins, "__import__", no_ray)
    for module in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, module)
    assert caption(photos, tmp_path / "o.jsonl", tiny_checkpoint) == 2
    err = capsys.readouterr().err
    assert "--engine ray needs Ray Data" in err and INSTALL in err
    assert not (tmp_path / "o.jsonl").exists()


def test_the_local_engine_refuses_uris(photos, tiny_checkpoint, tmp_path, capsys):
    assert caption(photos.as_uri(), tmp_path / "o.jsonl", tiny_checkpoint, engine="local") == 2
    assert "needs --engine ray" in capsys.readouterr().err


# -- on a local Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_run(local_ray, photos, tiny_checkpoint, tmp_path_factory):
    """The photos captioned by both engines (JSONL): (local records, Ray's OUT, its stderr, its log,
    the photos' folder as it was before)."""
    before = snapshot(photos)
    folder = tmp_path_factory.mktemp("first")
    local, out = folder / "local.jsonl", folder / "out" / "ray.jsonl"
    assert caption(photos, local, tiny_checkpoint, "--recursive", "--quiet", engine="local") == 0
    handler = _Lines()
    ray_data_log = logging.getLogger("ray.data")
    ray_data_log.addHandler(handler)  # Ray's loggers do not propagate to the root logger
    sys.stderr = tee = _Tee(sys.stderr)  # a module's fixture has no capsys
    try:
        assert caption(photos, out, tiny_checkpoint, "--recursive", "--html", folder / "gallery.html") == 0
    finally:
        ray_data_log.removeHandler(handler)
        sys.stderr = tee.stream
    return read_jsonl(local), out, tee.getvalue(), "\n".join(handler.lines), before


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class _Tee(io.StringIO):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)


@pytest.mark.integration  # a local Ray
def test_same_records_as_the_local_engine(first_run, photos):
    expected, out, err, log, _ = first_run
    assert_same_records(read_jsonl(out), expected)
    errors = {r["path"]: r["error"] for r in expected if "error" in r}
    assert set(errors) == {"empty.png", "link.jpg", "text.jpg", "truncated.jpg"}
    assert "No such file" in errors["link.jpg"] and str(photos) not in errors["link.jpg"]
    assert re.search(r"captioned 8, failed 4, skipped 2 \(not images, or hidden\); [\d.]+ s, [\d.]+ images/s", err)
    # Decoding runs in Ray tasks and the model in actors: two operators, not one fused.
    assert "TaskPoolMapOperator[MapBatches(decode_images)] -> ActorPoolMapOperator[MapBatches(CaptionActor)]" in log
    # 12 images in shards of 3: four shards, each complete, in path order, no record twice.
    shards = committed(out)
    assert list(shards) == [f"part-00001-{i:06d}.jsonl" for i in range(4)]
    in_shards = [json.loads(line)["path"] for data in shards.values() for line in data.splitlines()]
    assert in_shards == [r["path"] for r in expected]
    gallery = (out.parent.parent / "gallery.html").read_text()
    assert re.findall(r'data-path="([^"]*)"', gallery) == [r["path"] for r in expected]


@pytest.mark.integration  # a local Ray
def test_nothing_is_written_into_the_source(first_run, photos):
    assert snapshot(photos) == first_run[-1]


def as_the_local_engine_writes(fmt: str, records: list[dict], path: Path) -> Path:
    """The file the local engine's own store writes for these records."""
    store = STORES[fmt](path)
    store.open(overwrite=True)
    store.append(records)
    store.finish()
    return path


@pytest.mark.integration  # a local Ray
def test_uri_source_and_output_in_csv(first_run, photos, tiny_checkpoint, tmp_path):
    """SOURCE and OUT as URIs go through pyarrow's filesystems (file:// here; s3:// and gs:// alike)."""
    expected = first_run[0]
    out = tmp_path / "remote" / "captions.csv"
    assert caption(photos.as_uri(), out.as_uri(), tiny_checkpoint, "--recursive", "--quiet") == 0
    # Read as bytes, an empty file is "empty data", not "not an image"; pyarrow lists no broken links.
    expected = [r if r["path"] != "empty.png" else {**r, "error": "empty data, not an image"}
                for r in expected if r["path"] != "link.jpg"]
    local = as_the_local_engine_writes("csv", expected, tmp_path / "local.csv")
    with open(local, newline="") as a, open(out, newline="") as b:
        want, got = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["path"] for r in got] == [r["path"] for r in want] and len(got) == 11
    for g, e in zip(got, want):
        assert (g["caption"], g["error"]) == (e["caption"], e["error"])
        assert float(g["score"] or 0) == pytest.approx(float(e["score"] or 0), abs=1e-5)
    assert len(committed(out)) == 4


@pytest.mark.integration  # a local Ray
def test_rerun_captions_only_what_no_committed_shard_holds(first_run, photos, tiny_checkpoint, tmp_path, capsys):
    """A crash's leftovers, a photo added since, and OUT in another format (coco): the rerun
    captions what no committed shard holds and renders coco results as the local engine does."""
    expected, first_out = first_run[:2]
    folder, out = tmp_path / "photos", tmp_path / "results.json"
    shutil.copytree(photos, folder, symlinks=True)
    shutil.copytree(Path(str(first_out) + ".shards"), Path(str(out) + ".shards"))
    shards = committed(out)
    # As a crash leaves it: one shard never committed, one half-written under its temporary name.
    shard_dir = Path(str(out) + ".shards")
    (shard_dir / "part-00001-000001.jsonl").unlink()
    (shard_dir / "part-00001-000002.jsonl.tmp").write_text('{"path": "p6.jpg", "capt')
    (folder / "p9.jpg").write_bytes(make_photo(seed=19))  # and a photo added since
    assert caption(folder, out, tiny_checkpoint, "--recursive") == 0
    err = capsys.readouterr().err  # the lost shard held link.jpg, p0.jpg and p1.jpg
    assert "captioned 3, failed 1, skipped 2 (not images, or hidden), 9 already in OUT" in err
    journal = read_jsonl(Path(str(out) + ".records.jsonl"))
    assert [r["path"] for r in journal] == sorted([r["path"] for r in expected] + ["p9.jpg"])
    assert_same_records([r for r in journal if r["path"] != "p9.jpg"], expected)
    local = as_the_local_engine_writes("coco", journal, tmp_path / "local" / "results.json")
    assert out.read_bytes() == local.read_bytes()  # the results array, from the same records
    after = committed(out)
    kept = {name: data for name, data in shards.items() if name != "part-00001-000001.jsonl"}
    assert {name: after[name] for name in kept} == kept  # committed shards stay as they were
    assert sorted(set(after) - set(kept)) == ["part-00002-000000.jsonl", "part-00002-000001.jsonl"]

    assert caption(folder, out, tiny_checkpoint, "--recursive") == 0  # nothing left to do is no failure
    assert "captioned 0, failed 0, skipped 2 (not images, or hidden), 13 already in OUT" in capsys.readouterr().err
    assert caption(folder, out, tiny_checkpoint, "--recursive", "--overwrite", "--quiet") == 0
    assert list(committed(out)) == [f"part-00001-{i:06d}.jsonl" for i in range(5)]
    assert [r["path"] for r in read_jsonl(Path(str(out) + ".records.jsonl"))] == [r["path"] for r in journal]


def test_arguments_and_outputs_it_refuses(photos, tiny_checkpoint, tmp_path, capsys):
    require_module("ray", install=INSTALL)
    before = snapshot(photos)
    assert caption(photos, photos / "trip" / "o.jsonl", tiny_checkpoint) == 2
    assert caption(photos.as_uri(), (photos / "o.jsonl").as_uri(), tiny_checkpoint) == 2
    assert "inside" in capsys.readouterr().err
    assert caption(photos.as_uri(), tmp_path / "o.jsonl", tiny_checkpoint, "--html", tmp_path / "g.html") == 2
    assert "needs a local SOURCE" in capsys.readouterr().err
    assert caption(photos, tmp_path / "o.jsonl", tiny_checkpoint, "--shard-size", "0") == 2
    foreign = tmp_path / "mine.jsonl"
    foreign.write_text("precious data\n")
    assert caption(photos, foreign, tiny_checkpoint) == 2  # never replaces a file it did not write
    assert "exists without the shards folder" in capsys.readouterr().err
    assert foreign.read_text() == "precious data\n" and snapshot(photos) == before
