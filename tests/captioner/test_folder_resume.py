"""Resuming `captioner caption-folder`: a real run killed with SIGKILL or interrupted with SIGINT
(Ctrl-C), and half-written records, must end, after a rerun, with exactly one complete record per
image in sorted order."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captioner.cli import main
from tests.conftest import make_photo

# fp32 eager scores a photo the same whatever else is in its batch, so a resumed run's records can
# be compared byte for byte (int8 on ONNX Runtime may differ in the last digit between batches).
FAST = ["--max-new-tokens", "4", "--num-beams", "2", "--precision", "fp32"]
PHOTOS = 160  # enough that a run at ~50 photos/s is still going when the test stops it
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def many_photos(tmp_path: Path) -> Path:
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(PHOTOS):
        (folder / f"photo_{i:03d}.jpg").write_bytes(make_photo(160, 120, seed=i))
    return folder


def complete_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    text = path.read_text()
    return text[: text.rfind("\n") + 1].splitlines()


def start_run(folder: Path, out: Path, checkpoint: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "captioner.cli", "caption-folder", str(folder), "-o", str(out),
               "--checkpoint", checkpoint, "--batch-size", "2", "--workers", "1", *FAST]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=_answer_ctrl_c)


def _answer_ctrl_c() -> None:
    """A child inherits an ignored SIGINT, and Python then never installs its handler: whatever an
    earlier test (or a library it loaded) did to this process's SIGINT, the run answers Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_records(process: subprocess.Popen, out: Path, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(complete_lines(out)) < count:
        assert process.poll() is None, process.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the run wrote no records in time"
        time.sleep(0.02)


def end_group(process: subprocess.Popen) -> None:
    """The run's DataLoader workers are in its session: make sure none outlives the test."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def assert_one_record_each(out: Path, folder: Path) -> list[dict]:
    text = out.read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]
    assert [r["path"] for r in records] == sorted(p.name for p in folder.iterdir())
    assert all(r["caption"] and isinstance(r["score"], float) for r in records)
    return records


def _photos_and_args(tmp_path, names, out_name, tiny_checkpoint):
    """A folder of photos with these names, and the caption-folder arguments writing out_name."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / name).write_bytes(make_photo(seed=i))
    out = tmp_path / out_name
    return out, ["caption-folder", str(folder), "-o", str(out), "--checkpoint", tiny_checkpoint,
                 "--workers", "0", "--quiet", *FAST]


@pytest.mark.integration
def test_resume_after_kill_9(many_photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    process = start_run(many_photos, out, tiny_checkpoint)
    try:
        wait_for_records(process, out, 4)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        end_group(process)
        process.communicate()
    before = complete_lines(out)
    assert 4 <= len(before) < PHOTOS, "the run should have been killed part-way"
    assert main(["caption-folder", str(many_photos), "-o", str(out), "--checkpoint", tiny_checkpoint,
                 "--workers", "0", "--quiet", *FAST]) == 0
    assert_one_record_each(out, many_photos)
    assert complete_lines(out)[: len(before)] == before  # what was written stays as it was


@pytest.mark.integration
def test_ctrl_c_stops_cleanly_and_the_rerun_finishes(many_photos, tiny_checkpoint, tmp_path):
    out = tmp_path / "captions.jsonl"
    process = start_run(many_photos, out, tiny_checkpoint)
    try:
        wait_for_records(process, out, 2)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        _, err = process.communicate(timeout=60)
    finally:
        end_group(process)
    assert process.returncode == 130, (signal.getsignal(signal.SIGINT), err[-2000:])
    assert "interrupted" in err and "run the same command again" in err
    done = len(complete_lines(out))
    assert 2 <= done < PHOTOS and out.read_text().endswith("\n")
    assert main(["caption-folder", str(many_photos), "-o", str(out), "--checkpoint", tiny_checkpoint,
                 "--workers", "0", "--quiet", *FAST]) == 0
    assert_one_record_each(out, many_photos)


def test_half_written_jsonl_record_is_dropped_and_redone(tmp_path, tiny_checkpoint):
    out, args = _photos_and_args(tmp_path, [f"p{i}.jpg" for i in range(5)], "o.jsonl", tiny_checkpoint)
    assert main(args) == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:2]) + lines[2][:17])  # killed in the middle of record 3
    assert main(args) == 0
    # Same records, none twice, none half. The redone records come from another batch of images,
    # whose matrix products may round the last digits of the log-probabilities differently.
    redone, expected = (out.read_text().splitlines(), full.decode().splitlines())
    assert len(redone) == len(expected) and redone[:2] == expected[:2]
    for ours, theirs in zip(map(json.loads, redone), map(json.loads, expected)):
        assert ours["path"] == theirs["path"] and ours["caption"] == theirs["caption"]
        assert ours["sequences"][0]["log_prob"] == pytest.approx(theirs["sequences"][0]["log_prob"], abs=1e-4)


def test_half_written_csv_row_is_dropped_and_redone(tmp_path, tiny_checkpoint):
    out, args = _photos_and_args(tmp_path, [f"p{i}, \"quoted\".jpg" for i in range(4)], "o.csv", tiny_checkpoint)
    assert main(args) == 0
    full = out.read_bytes()
    lines = full.splitlines(keepends=True)
    for cut in (b"".join(lines[:3]) + lines[3][:5], b"".join(lines[:2]) + lines[2][:-1]):
        out.write_bytes(cut)  # inside a quoted path; or a whole row but its newline
        assert main(args) == 0
        assert out.read_bytes() == full
    with open(out, newline="") as handle:
        assert [r["path"] for r in csv.DictReader(handle)] == [f"p{i}, \"quoted\".jpg" for i in range(4)]


def test_coco_resumes_from_its_journal(tmp_path, tiny_checkpoint):
    out, args = _photos_and_args(tmp_path, [f"{i + 1}.jpg" for i in range(4)], "results.json", tiny_checkpoint)
    assert main(args) == 0
    results = json.loads(out.read_text())
    journal = Path(str(out) + ".records.jsonl")
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + lines[1][:10])  # killed before the results were rendered
    out.unlink()
    assert main(args) == 0
    assert json.loads(out.read_text()) == results
    assert [r["image_id"] for r in results] == [1, 2, 3, 4]
