"""`captioner caption-folder DIR -o OUT`: caption every image of a folder, batched and resumable.

    captioner caption-folder photos/ -o captions.jsonl --recursive --html gallery.html

Two engines run this command: this module's local one (below), and `--engine ray`
(`captioner/batch/ray_engine.py`: the same listing, records and writers on a Ray cluster). Both build
records with `caption_record` / `error_record` and write them with `encode_records` and
`coco_results`: one record format for every engine.

How the local engine runs:
- `find_images` lists DIR in sorted order. Image files are picked by extension, and files with
  another extension (or none) by their first bytes; hidden files, non-images and non-regular
  files are skipped. Directory symlinks are followed once: a loop is detected by (device, inode).
- DataLoader workers decode and resize the images (`captioner.batch.imageset`) while the main process
  runs the encoder and decoder on whole batches; records are written in input order.
- Every batch is appended to OUT with one write and an fsync, so an interrupted run (Ctrl-C,
  `kill -9`, power loss) loses at most the batch in flight. Run the same command again and it
  drops a half-written tail, skips the images already in OUT, and captions the rest;
  `--overwrite` starts afresh.
- Nothing is ever written into DIR: OUT and the gallery must lie outside it.

Formats: `jsonl` (one object a line: path, caption, score; or path, error), `csv` (path, caption,
score, error) and `coco` (the results array the coco-caption toolkit reads, rendered from a
`OUT.records.jsonl` journal that also keeps the error records).

Exit status: 0 when at least one image has a caption in OUT, 1 when nothing could be captioned
(no image found, or every one failed), 2 when OUT cannot be written or the arguments are wrong,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..cli import add_decode_arguments, add_model_arguments, decode_options, load_model

FORMATS = ("jsonl", "csv", "coco")

# Extensions that name an image format; such files always get a record (a caption or an error).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".jpx", ".avif",
    ".heic", ".heif", ".qoi", ".pcx",
})
CSV_FIELDS = ("path", "caption", "score", "error")
JOURNAL_SUFFIX = ".records.jsonl"  # beside a coco OUT: every record, errors included


# -- finding the images ---------------------------------------------------------------------------


@dataclass
class Discovery:
    images: list[str] = field(default_factory=list)  # paths relative to DIR, posix style, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)


def sniff_image(head: bytes) -> bool:
    """Whether the first bytes of a file are those of an image format Pillow reads."""
    if head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"II*\x00",
                        b"MM\x00*", b"II+\x00", b"MM\x00+", b"\x00\x00\x01\x00", b"qoif",
                        b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return True
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1"):
        return True
    if head[:2] == b"BM" and len(head) >= 18:  # BMP: check the DIB header size too
        return int.from_bytes(head[14:18], "little") in (12, 40, 52, 56, 64, 108, 124)
    return len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3] in b" \t\r\n"


def find_images(root: str | os.PathLike, *, recursive: bool = False, glob: str | None = None) -> Discovery:
    """List the images under `root` (sorted by relative path) and what was skipped, and why.

    `glob` is matched case-insensitively against the file name, or against the relative path when
    it contains a '/'; files it does not match are left out silently."""
    root = Path(root)
    found = Discovery()
    seen: set[tuple[int, int]] = set()
    pending = [("", root)]
    while pending:
        prefix, directory = pending.pop()
        try:
            info = os.stat(directory)
            if (info.st_dev, info.st_ino) in seen:
                found.skipped.append((prefix.rstrip("/") or ".", "directory already visited (symlink loop)"))
                continue
            seen.add((info.st_dev, info.st_ino))
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as error:
            found.skipped.append((prefix.rstrip("/") or ".", f"cannot list directory: {error.strerror or error}"))
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.name.startswith("."):
                found.skipped.append((relative, "hidden"))
                continue
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError as error:  # e.g. a symlink that points at itself
                found.skipped.append((relative, f"unreadable entry: {error.strerror or error}"))
                continue
            if is_dir:
                if recursive:
                    pending.append((relative + "/", Path(entry.path)))
                continue
            if glob and not _glob_match(glob, relative):
                continue
            is_image_name = os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
            if is_file:
                if is_image_name or _sniff_file(entry.path):
                    found.images.append(relative)
                else:
                    found.skipped.append((relative, "not an image"))
            elif is_image_name and entry.is_symlink():
                found.images.append(relative)  # a broken link: reading it gives an error record
            else:
                found.skipped.append((relative, "not a regular file"))
    found.images.sort()
    found.skipped.sort()
    return found


def _glob_match(pattern: str, relative: str) -> bool:
    target = relative if "/" in pattern else relative.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(target.lower(), pattern.lower())


def _sniff_file(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return sniff_image(handle.read(32))
    except OSError:
        return False


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# -- records and where they go ---------------------------------------------------------------------


class OutputError(RuntimeError):
    """OUT exists but is not this command's output, or cannot be read back."""


def output_failed(error: Exception, target: object = "the output") -> int:
    """Say why the output could not be written (an `OutputError` says it all, an OSError names the
    file) -> exit status 2, for both engines."""
    detail = str(error) if isinstance(error, OutputError) else f"cannot write {target}: {error}"
    print(f"captioner caption-folder: {detail}", file=sys.stderr)
    return 2


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
            _fsync_directory(self.path.parent)
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
            _fsync_directory(self.path.parent)
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


STORES = {"jsonl": JsonlStore, "csv": CsvStore, "coco": CocoStore}


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


def coco_results(records: list[dict[str, Any]]) -> bytes:
    """The coco-caption results array of the captioned records, in their order."""
    captioned = [r for r in records if "caption" in r]
    ids = coco_image_ids([r["path"] for r in captioned])
    results = [{"image_id": ids[r["path"]], "caption": r["caption"], "score": r["score"],
                "file_name": r["path"]} for r in captioned]
    return json.dumps(results, indent=1).encode()


def write_atomically(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write `data` (bytes, or chunks of them) to PATH.tmp, then rename it to PATH: readers see
    the old file or the whole new one, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        for chunk in [data] if isinstance(data, bytes) else data:
            handle.write(chunk)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def _fsync_directory(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def caption_record(path: str, result) -> dict[str, Any]:
    record: dict[str, Any] = {"path": path, "caption": result.text, "score": round(result.score, 6)}
    if len(result.sequences) > 1:
        record["sequences"] = [{"caption": s.text, "score": round(s.score, 6)} for s in result.sequences]
    # The words the caption had to say or avoid, and why (only where there were any).
    record.update({key: value for key, value in result.requirements().items() if value})
    return record


def error_record(path: str, reason: str) -> dict[str, Any]:
    return {"path": path, "error": reason}


def error_reason(reason: str, absolute: str, relative: str) -> str:
    """Error messages name the file; the record already does, so keep the reason, with the
    relative path wherever the message repeats the file's absolute one."""
    if reason.startswith(f"{absolute}: "):
        reason = reason[len(absolute) + 2:]
    return reason.replace(absolute, relative)


# -- the command -----------------------------------------------------------------------------------


def register(commands) -> None:
    from . import ray_engine  # imports ray only when the command runs

    parser = commands.add_parser(
        "caption-folder", help="caption every image in a folder (batched, resumable; locally or on Ray)",
        description="Caption every image in DIR, in sorted order, into OUT. Interrupted runs resume "
                    "where they stopped when run again with the same arguments.")
    parser.add_argument("dir", metavar="DIR",
                        help="folder of images (nothing is written into it); with --engine ray also a "
                             "URI such as s3://bucket/photos")
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file (outside DIR); with --engine ray also a URI")
    parser.add_argument("--format", choices=FORMATS, default=None,
                        help="jsonl, csv or coco (default: from OUT's extension, else jsonl)")
    parser.add_argument("--recursive", action="store_true", help="descend into subfolders")
    parser.add_argument("--glob", default=None, metavar="PATTERN",
                        help="only files whose name matches, case-insensitively, e.g. '*.jpg' "
                             "(a pattern with '/' matches the relative path)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per model batch (default: 32)")
    parser.add_argument("--workers", type=int, default=2,
                        help="local engine: image-decoding worker processes; 0 decodes in the main "
                             "process (default: 2)")
    parser.add_argument("--html", default=None, metavar="GALLERY", help="also write a static HTML gallery")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    parser.add_argument("--overwrite", action="store_true", help="start again instead of resuming OUT")
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this machine (default); ray: a Ray cluster, with Ray Data "
                             "(pip install 'captioner[ray]')")
    ray_engine.add_arguments(parser)
    add_model_arguments(parser)
    add_decode_arguments(parser)
    parser.set_defaults(func=run)


@dataclass
class Summary:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0
    already_done: int = 0
    elapsed: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return (self.captioned + self.failed) / self.elapsed if self.elapsed > 0 else 0.0

    def describe(self, output: Path | str) -> str:
        line = (f"captioned {self.captioned}, failed {self.failed}, skipped {self.skipped} (not images, or hidden)"
                f"{f', {self.already_done} already in OUT' if self.already_done else ''}; "
                f"{self.elapsed:.1f} s, {self.images_per_s:.2f} images/s -> {output}")
        shown = [f"  {path}: {reason}" for path, reason in self.failures[:10]]
        if len(self.failures) > 10:
            shown.append(f"  ... and {len(self.failures) - 10} more (error records in OUT)")
        return "\n".join(["failed:", *shown, line] if shown else [line])


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The checks both engines make before any work; returns the decoding options."""
    from ..decoding import DecodeConfig

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    options = decode_options(args)
    DecodeConfig.from_kwargs(**options)  # bad options fail before the model loads
    return options


def report(args: argparse.Namespace, summary: Summary, *, found_any: bool, captioned_any: bool,
           interrupted: bool, output: str, source: str, written: str | None = None) -> int:
    """The summary on stderr and the exit status, alike for both engines. `written` says what an
    interrupted run kept (default: every image it captioned, in OUT)."""
    if not args.quiet:
        print(summary.describe(output), file=sys.stderr)
    if interrupted:
        written = written or f"{summary.captioned + summary.failed} images written to {output}"
        print(f"interrupted: {written}; run the same command again to finish", file=sys.stderr)
        return 130
    if not found_any:
        print(f"captioner caption-folder: no images in {source}"
              f"{'' if args.recursive else ' (use --recursive for subfolders)'}", file=sys.stderr)
        return 1
    if not captioned_any:
        print("captioner caption-folder: no image could be captioned", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        from .ray_engine import run as run_on_ray

        return run_on_ray(args)
    from ..decoding import DecodeConfig

    if "://" in args.dir or "://" in args.output:
        raise ValueError("a URI for DIR or OUT needs --engine ray (the local engine reads and writes local files)")
    root, output = Path(args.dir), Path(args.output)
    fmt = output_format(args.format, args.output)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for name, path in (("OUT", output), ("the gallery", Path(args.html) if args.html else None)):
        if path is not None and _inside(path, root):
            raise ValueError(f"{name} ({path}) is inside {root}: nothing is written into the input folder")
    config = DecodeConfig.from_kwargs(**check_arguments(args))

    store = STORES[fmt](output)
    try:
        store.open(overwrite=args.overwrite)
    except (OSError, OutputError) as error:
        return output_failed(error, output)

    found = find_images(root, recursive=args.recursive, glob=args.glob)
    done = {r["path"] for r in store.records}
    todo = [p for p in found.images if p not in done]
    summary = Summary(skipped=len(found.skipped), already_done=len(found.images) - len(todo))
    interrupted = False
    try:
        if todo:
            model = load_model(args)
            start = time.perf_counter()  # throughput counts captioning, not loading the model
            try:
                _caption_all(model, config, root, todo, store, summary, args)
            finally:
                summary.elapsed = time.perf_counter() - start
    except KeyboardInterrupt:
        interrupted = True
    except OSError as error:
        store.finish()
        return output_failed(error, output)
    try:
        store.finish()
        if args.html and not interrupted:
            from .gallery import write_gallery

            write_gallery(store.records, root, Path(args.html), title=f"Captions of {root.resolve().name}")
    except OSError as error:
        return output_failed(error)
    return report(args, summary, found_any=bool(found.images), interrupted=interrupted, output=str(output),
                  captioned_any=any("caption" in r for r in store.records), source=str(root))


def _caption_all(model, config, root: Path, todo: list[str], store: JsonlStore, summary: Summary,
                 args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from .imageset import ImageFileDataset, pixel_loader

    absolute = [os.path.join(root, p) for p in todo]
    dataset = ImageFileDataset(absolute, model.preprocessing)
    loader = pixel_loader(dataset, batch_size=args.batch_size, workers=args.workers)
    with tqdm(total=len(todo), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
              smoothing=0.1) as bar:
        for batch in loader:
            records: dict[int, dict[str, Any]] = {}
            if batch.indices:
                for index, result in zip(batch.indices, model.caption_pixels(batch.pixels, config)):
                    records[index] = caption_record(todo[index], result)
            for index, reason in batch.failures:
                records[index] = error_record(todo[index], error_reason(reason, absolute[index], todo[index]))
                summary.failures.append((todo[index], records[index]["error"]))
            store.append([records[i] for i in sorted(records)])  # one write + fsync per batch
            summary.captioned += len(batch.indices)
            summary.failed += len(batch.failures)
            bar.update(len(records))
            if summary.failed:
                bar.set_postfix(failed=summary.failed, refresh=False)

