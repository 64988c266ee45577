"""The local engine's outputs, appended to batch by batch and resumed after an interruption.

Every batch is appended to OUT with one write and an fsync, so an interrupted run (Ctrl-C,
`kill -9`, power loss) loses at most the batch in flight. Opening OUT again drops a half-written
tail and reads back the complete records, so that a rerun appends exactly the missing ones;
`overwrite` starts afresh. Whole files (the coco results, the Ray engine's shards and outputs)
are written with `captioner.files.write_atomically`.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from ..files import fsync_directory, write_atomically
from .records import (CSV_FIELDS, CSV_HEADER, JOURNAL_SUFFIX, OutputError, coco_results, encode_csv, encode_jsonl,
                      parse_records)


class JsonlStore:
    """One JSON record a line. `open()` drops a half-written last line (an interrupted write) and
    reads back the complete records, so that a rerun appends exactly the missing ones."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        self._handle = None

    def open(self, *, overwrite: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists():
            self._handle = open(self.path, "wb")
            fsync_directory(self.path.parent)
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1  # a record is complete once its newline is written
        self.records.extend(parse_records(data[:end].split(b"\n")[:-1], self.path))
        self._handle = open(self.path, "r+b")
        self._handle.truncate(end)
        self._handle.seek(end)

    def append(self, records: list[dict[str, Any]]) -> None:
        self._write(encode_jsonl(records))
        self.records.extend(records)

    def _write(self, data: bytes) -> None:
        self._handle.write(data)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def finish(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class CsvStore(JsonlStore):
    """path, caption, score, error; one row per record, RFC 4180 quoting."""

    def open(self, *, overwrite: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists() or self.path.stat().st_size == 0:
            self._handle = open(self.path, "wb")
            self._write(CSV_HEADER)
            fsync_directory(self.path.parent)
            return
        text = self.path.read_bytes().decode("utf-8", errors="surrogateescape")
        rows, end = _complete_csv_rows(text)
        if not rows or tuple(rows[0]) != CSV_FIELDS:
            raise OutputError(f"{self.path} is not a caption-folder CSV (its header is not "
                              f"{','.join(CSV_FIELDS)}); choose another output or pass --overwrite")
        for row in rows[1:]:
            path, caption, score, error = (row + ["", "", "", ""])[:4]
            if error:
                self.records.append({"path": path, "error": error})
            else:
                self.records.append({"path": path, "caption": caption, "score": float(score)})
        self._handle = open(self.path, "r+b")
        end_bytes = len(text[:end].encode("utf-8", errors="surrogateescape"))
        self._handle.truncate(end_bytes)
        self._handle.seek(end_bytes)

    def append(self, records: list[dict[str, Any]]) -> None:
        self._write(encode_csv(records))
        self.records.extend(records)


def _complete_csv_rows(text: str) -> tuple[list[list[str]], int]:
    """The rows of `text` that end with a newline, and the offset just after the last of them."""
    position = 0

    def lines():
        nonlocal position
        for line in io.StringIO(text, newline=""):
            position += len(line)
            yield line

    rows, end = [], 0
    try:
        for row in csv.reader(lines()):
            if not text[:position].endswith(("\n", "\r")):
                break  # the last row lost its end: an interrupted write
            rows.append(row)
            end = position
    except csv.Error:
        pass  # an unclosed quote at the end: also an interrupted write
    return rows, end


class CocoStore(JsonlStore):
    """OUT is the coco-caption results array `[{"image_id", "caption", ...}]`; it is rendered
    (atomically) from the journal OUT.records.jsonl, which also holds the error records."""

    def __init__(self, path: Path):
        super().__init__(Path(str(path) + JOURNAL_SUFFIX))
        self.results_path = path

    def open(self, *, overwrite: bool) -> None:
        if not overwrite and self.results_path.exists() and not self.path.exists():
            raise OutputError(f"{self.results_path} exists without its journal {self.path.name}; "
                              "choose another output or pass --overwrite")
        super().open(overwrite=overwrite)

    def finish(self) -> None:
        super().finish()
        write_atomically(self.results_path, coco_results(self.records))


STORES = {"jsonl": JsonlStore, "csv": CsvStore, "coco": CocoStore}
