"""What caption-folder writes, alike for every engine: one record per image, its encodings and formats.

A record is `{"path", **CaptionResult.to_dict()}` (`caption`, `score`, `sequences`, `required`,
`excluded`: the shape of `captioner caption --json` and of the HTTP API) or `{"path", "error"}`. Formats: `jsonl` (one record a line), `csv` (path, caption,
score, error) and `coco` (the results array the coco-caption toolkit reads, rendered from a
`OUT.records.jsonl` journal that also keeps the error records).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

FORMATS = ("jsonl", "csv", "coco")
CSV_FIELDS = ("path", "caption", "score", "error")
JOURNAL_SUFFIX = ".records.jsonl"  # beside a coco OUT: every record, errors included


class OutputError(RuntimeError):
    """OUT exists but is not this command's output, or cannot be read back."""


def caption_record(path: str, result) -> dict[str, Any]:
    """The result's one JSON shape (`CaptionResult.to_dict`), with the image's path first."""
    return {"path": path, **result.to_dict()}


def error_record(path: str, reason: str) -> dict[str, Any]:
    return {"path": path, "error": reason}


def error_reason(reason: str, absolute: str, relative: str) -> str:
    """Error messages name the file; the record already does, so keep the reason, with the
    relative path wherever the message repeats the file's absolute one."""
    if reason.startswith(f"{absolute}: "):
        reason = reason[len(absolute) + 2:]
    return reason.replace(absolute, relative)


def parse_records(lines: Iterable[bytes], where: object) -> Iterator[dict[str, Any]]:
    """The caption-folder records of JSON lines read back from `where` (an output or a shard);
    anything else is an OutputError: the file is not ours to append to."""
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise OutputError(f"{where} line {number} is not a caption-folder record; "
                              "choose another output or pass --overwrite")
        yield record


def output_format(fmt: str | None, output: str) -> str:
    """--format, else from OUT's extension (.csv, .json for coco), else jsonl."""
    return fmt or {".csv": "csv", ".json": "coco"}.get(os.path.splitext(output)[1].lower(), "jsonl")


def encode_jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=True).encode() + b"\n" for r in records)


def encode_csv(records: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writerows(records)
    return buffer.getvalue().encode("utf-8", errors="surrogateescape")


CSV_HEADER = encode_csv([dict(zip(CSV_FIELDS, CSV_FIELDS))])


def encode_records(fmt: str, records: list[dict[str, Any]]) -> bytes:
    """The bytes that add `records` to an OUT of this format (for coco: to its journal); a CSV
    file starts with CSV_HEADER."""
    return encode_csv(records) if fmt == "csv" else encode_jsonl(records)


def coco_image_ids(paths: list[str]) -> dict[str, int | str]:
    """COCO-style integer ids from the digits that end each file name (COCO_val2014_000000391895.jpg
    -> 391895) when they are unique; otherwise the relative paths themselves."""
    ids: dict[str, int | str] = {}
    for path in paths:
        match = re.search(r"(\d+)$", Path(path).stem)
        if match is None:
            return {p: p for p in paths}
        ids[path] = int(match.group(1))
    if len(set(ids.values())) != len(ids):
        return {p: p for p in paths}
    return ids


def coco_results(records: list[dict[str, Any]]) -> bytes:
    """The coco-caption results array of the captioned records, in their order."""
    captioned = [r for r in records if "caption" in r]
    ids = coco_image_ids([r["path"] for r in captioned])
    results = [{"image_id": ids[r["path"]], "caption": r["caption"], "score": r["score"],
                "file_name": r["path"]} for r in captioned]
    return json.dumps(results, indent=1).encode()
