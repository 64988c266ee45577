"""caption-folder's skeleton, `job.run(args, engine)`: which engine steps it calls, in which
order, and what it makes of their outcomes, with a stub engine that records its calls."""

from __future__ import annotations

from pathlib import Path

import pytest

from captioner.batch import job
from captioner.batch.listing import Discovery
from captioner.batch.records import OutputError
from captioner.cli import build_parser


class Recorder:
    """An engine whose OUT already holds `done` and whose DIR holds a, b and c; the step named in
    `fails` raises the exception given for it."""

    source, output, writing, image_root = "DIR", "OUT", "OUT.parts", Path(".")

    def __init__(self, fails: dict[str, BaseException] | None = None, done: tuple[str, ...] = ("a.jpg",)):
        self.calls: list[tuple] = []
        self.fails, self.done = fails or {}, done

    def check(self, args, options):
        self.calls.append(("check",))

    def open(self):
        self.calls.append(("open",))
        if "open" in self.fails:
            raise self.fails["open"]
        return set(self.done)

    def find(self):
        self.calls.append(("find",))
        return Discovery(images=["a.jpg", "b.jpg", "c.jpg"], skipped=[("notes.txt", "not an image")])

    def caption(self, todo, summary):
        self.calls.append(("caption", todo, summary.already_done, summary.skipped))
        if "caption" in self.fails:
            raise self.fails["caption"]
        summary.captioned = len(todo)

    def finish(self, *, complete, keep):
        self.calls.append(("finish", complete, keep))
        return True

    def kept(self, summary):
        return f"{summary.captioned} kept"


def arguments(*extra: str):
    return build_parser().parse_args(["caption-folder", "photos", "-o", "out.jsonl", "--quiet", *extra])


def test_the_steps_in_order_with_only_what_out_lacks_to_caption():
    engine = Recorder()
    assert job.run(arguments(), engine) == 0
    assert engine.calls == [("check",), ("open",), ("find",), ("caption", ["b.jpg", "c.jpg"], 1, 1),
                            ("finish", True, None)]


def test_nothing_left_to_do_captions_nothing_and_still_finishes():
    engine = Recorder(done=("a.jpg", "b.jpg", "c.jpg"))
    assert job.run(arguments(), engine) == 0
    assert engine.calls == [("check",), ("open",), ("find",), ("finish", True, None)]


def test_an_interrupted_run_keeps_its_work_and_says_how_to_finish(capsys):
    engine = Recorder(fails={"caption": KeyboardInterrupt()})
    assert job.run(arguments("--html", "gallery.html"), engine) == 130
    assert engine.calls[-1] == ("finish", False, None)  # no gallery of an unfinished run
    assert "interrupted: 0 kept; run the same command again to finish" in capsys.readouterr().err


def test_a_failed_write_while_captioning_names_what_was_being_written(capsys):
    engine = Recorder(fails={"caption": OSError("disk full")})
    assert job.run(arguments(), engine) == 2
    assert engine.calls[-1] == ("finish", False, None)
    assert "captioner caption-folder: cannot write OUT.parts: disk full" in capsys.readouterr().err


def test_an_output_it_cannot_open_stops_before_listing(capsys):
    engine = Recorder(fails={"open": OutputError("OUT is not ours")})
    assert job.run(arguments(), engine) == 2
    assert engine.calls == [("check",), ("open",)]
    assert "captioner caption-folder: OUT is not ours" in capsys.readouterr().err


def test_bad_arguments_are_refused_before_the_engine_sees_them():
    engine = Recorder()
    with pytest.raises(ValueError, match="--batch-size"):
        job.run(arguments("--batch-size", "0"), engine)
    assert engine.calls == []
