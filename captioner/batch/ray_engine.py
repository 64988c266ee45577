"""`captioner caption-folder SOURCE -o OUT --engine ray`: the folder command on a Ray cluster.

    captioner caption-folder s3://bucket/photos -o s3://bucket/captions.jsonl --engine ray \\
        --address auto --actors 8 --num-gpus-per-actor 1 --batch-size 64

The same command as the local engine (`captioner/batch/local.py`): the same listing and filters, decoding
flags, formats, records and captions; Ray Data spreads the work over the cluster. Ray is imported
only when the command runs (`pip install 'captioner[ray]'`).

How it runs:
- This process, the driver, lists SOURCE as the local engine does (`find_images` for a folder;
  pyarrow's filesystems for a URI: s3://, gs://, abfs://, hdfs://, file://, or fsspec's for other
  protocols) and leaves out the images that OUT's committed shards already hold. It reads and
  checks the checkpoint (`checkpoint_preprocessing`: the decoding tasks need its preprocessing)
  and ships its bytes to the actors through Ray's object store, so every actor runs the same model.
- The rest, in sorted order, is cut into shards of --shard-size images and streamed through Ray
  Data: `from_items` (paths) -> `decode_images`, Ray tasks of one CPU that read and decode the
  files -> `CaptionActor`, a pool of --actors actors, each loading the model once (with CPU
  threads or a GPU) -> the driver, one JSON record per image. Execution streams, and its object
  store budget (`object_store_budget`) lets decoding run only a few batches ahead of the models:
  memory does not grow with the number of photos.
- Ray restarts an actor whose process dies and runs its batch again (Ray Data's actors are
  created with unlimited restarts and task retries); the driver keeps one record per image,
  whatever arrives twice.
- Shards: the driver holds the records of unfinished shards; a finished one is written whole to
  OUT.shards/part-RRRRR-SSSSSS.jsonl (R: the run, S: the shard) under a temporary name that is
  renamed once complete (on object stores: a server-side copy, which appears whole or not at all).
  A rerun counts only such names, so a crash never leaves a half-written shard counted as done: it
  captions what no committed shard holds. `--overwrite` deletes the shards and starts over.
- Finally OUT is rendered from every shard, merged in path order, with the local engine's writers:
  the file (for coco, with its OUT.records.jsonl journal) the local engine writes. OUT.shards/ is
  kept: a later run resumes from it, captions photos added to SOURCE since, and merges again.

The steps around this work (checks, resume, summary, exit status) are `job.run`'s, as for the
local engine.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..files import write_atomically
from .job import Summary
from .listing import Discovery, find_images, hidden, path_inside, sniff_image
from .records import (CSV_HEADER, JOURNAL_SUFFIX, OutputError, caption_record, coco_results, encode_jsonl,
                      encode_records, error_reason, error_record, output_format, parse_records)

INSTALL = "pip install 'captioner[ray]'"
SHARDS_SUFFIX = ".shards"
SHARD_NAME = re.compile(r"part-(\d{5})-(\d{6})\.jsonl")
URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
# What one decoding task may hold: a photo at the 40-megapixel limit decodes through about 160 MB
# of RGBA, plus the batch's pixels. Reserving it keeps Ray from starting more decoding tasks than a
# node's memory holds; and since remote arguments then differ, Ray Data does not fuse decoding
# into the model actors (it fuses maps whose arguments match), so the two scale apart.
DECODE_TASK_MEMORY = 512 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ray engine (--engine ray)")
    group.add_argument("--address", default=None, metavar="ADDRESS",
                       help="the Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: RAY_ADDRESS, "
                            "else a Ray started on this machine for the run)")
    group.add_argument("--actors", type=int, default=None, metavar="N",
                       help="model actors (default: one per --num-gpus-per-actor GPUs of the cluster; on CPUs "
                            "one per --num-cpus-per-actor + 1 CPUs, leaving room for decoding)")
    group.add_argument("--num-cpus-per-actor", type=float, default=1.0, metavar="C",
                       help="CPUs Ray reserves for each actor (default: 1)")
    group.add_argument("--num-gpus-per-actor", type=float, default=0.0, metavar="G",
                       help="GPUs for each actor; above 0 the model runs on CUDA (default: 0)")
    group.add_argument("--threads-per-actor", type=int, default=None, metavar="T",
                       help="torch threads of each actor's model (default: C; with a Ray started for the run, "
                            "this machine's cores divided among the actors)")
    group.add_argument("--shard-size", type=int, default=1000, metavar="N",
                       help="images per output shard, the unit a rerun resumes from (default: 1000)")


# -- files and folders, local or remote ------------------------------------------------------------


def is_uri(name: str) -> bool:
    return URI.match(name) is not None


def filesystem(uri: str):
    """(pyarrow filesystem, path) for a URI: pyarrow's own filesystems where it has one (s3, gs,
    abfs, hdfs, file), else fsspec's through pyarrow's adapter. Credentials come from the usual
    places (environment, instance roles, config files)."""
    import pyarrow.fs as pafs

    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as error:  # pyarrow's ArrowInvalid for a scheme it lacks
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{uri}: pyarrow cannot open this URI ({error}); installing fsspec may help") from error
        fs, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


class Location:
    """A file or folder named by a local path (read and written with os) or by a URI (pyarrow)."""

    def __init__(self, name: str, fs=None, path: str | None = None):
        self.name = name
        if path is None:
            fs, path = filesystem(name) if is_uri(name) else (None, os.path.abspath(name))
        self.fs, self.path = fs, path

    def __str__(self) -> str:
        return self.name

    @property
    def local(self) -> bool:
        return self.fs is None

    def child(self, name: str) -> "Location":
        return Location(f"{self.name.rstrip('/')}/{name}", self.fs, f"{self.path.rstrip('/')}/{name}")

    def with_suffix(self, suffix: str) -> "Location":
        return Location(self.name + suffix, self.fs, self.path + suffix)

    def _info(self):
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        if self.local:
            return os.path.lexists(self.path)
        from pyarrow.fs import FileType

        return self._info().type != FileType.NotFound

    def is_dir(self) -> bool:
        if self.local:
            return os.path.isdir(self.path)
        from pyarrow.fs import FileType

        return self._info().type == FileType.Directory

    def read_bytes(self) -> bytes:
        if self.local:
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def write(self, chunks: Iterable[bytes]) -> None:
        """Write the file whole: under a temporary name first, renamed once complete."""
        if self.local:
            write_atomically(self.path, chunks)
            return
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        temporary = self.path + ".tmp"
        with self.fs.open_output_stream(temporary) as stream:
            for chunk in chunks:
                stream.write(chunk)
        self.fs.move(temporary, self.path)

    def names(self) -> list[str]:
        """The names of the files directly inside this folder (none if it does not exist)."""
        if self.local:
            try:
                return sorted(e.name for e in os.scandir(self.path) if e.is_file())
            except FileNotFoundError:
                return []
        from pyarrow.fs import FileSelector, FileType

        infos = self.fs.get_file_info(FileSelector(self.path, allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == FileType.File)

    def remove(self) -> None:
        """Delete this file or folder, if it exists."""
        if not self.exists():
            return
        if self.local:
            if os.path.isdir(self.path) and not os.path.islink(self.path):
                shutil.rmtree(self.path)
            else:
                os.unlink(self.path)
        elif self.is_dir():
            self.fs.delete_dir(self.path)
        else:
            self.fs.delete_file(self.path)


def inside(path: Location, folder: Location) -> bool:
    if path.local and folder.local:
        return path_inside(Path(path.path), Path(folder.path))
    if path.local or folder.local or path.fs.type_name != folder.fs.type_name:
        return False
    base = folder.path.rstrip("/")
    return path.path == base or path.path.startswith(base + "/")


def find_images_at(source: Location, *, recursive: bool = False, glob: str | None = None) -> Discovery:
    """`find_images` for a folder named by a URI: the same rules (sorted relative paths, hidden
    entries skipped, image extensions or else the first bytes) on an object store's listing."""
    if source.local:
        return find_images(source.path, recursive=recursive, glob=glob)
    from pyarrow.fs import FileSelector, FileType

    if not source.is_dir():
        raise FileNotFoundError(f"{source} is not a folder")
    base = source.path.rstrip("/")
    found = Discovery()
    skipped_hidden: set[str] = set()
    for info in source.fs.get_file_info(FileSelector(base, recursive=recursive)):
        relative = info.path[len(base) + 1:]
        parts = relative.split("/")
        dot = next((i for i, part in enumerate(parts) if hidden(part)), None)
        if dot is not None:  # a store lists a hidden folder's contents too: skip it once, as a whole
            skipped_hidden.add("/".join(parts[:dot + 1]))
            continue
        if info.type != FileType.Directory:
            found.add_file(relative, glob=glob, regular=info.type == FileType.File,
                           sniff=lambda path=info.path: _sniff_remote(source.fs, path))
    found.skipped.extend((name, "hidden") for name in skipped_hidden)
    return found.sort()


def _sniff_remote(fs, path: str) -> bool:
    try:
        with fs.open_input_file(path) as handle:
            return sniff_image(handle.read(32))
    except OSError:
        return False


# -- the Ray side: decoding tasks and model actors --------------------------------------------------

_FILESYSTEMS: dict[str, Any] = {}  # per worker process: a URI's filesystem, made once


def decode_images(batch: dict, *, source: str, preprocessing: dict, size: int) -> dict:
    """A Ray task: read and decode a batch of files. Pixels (B, 3, S, S) uint8, and for each
    image an error message ("" when it decoded; its pixels are then zeros)."""
    import numpy as np

    from .imageset import decode_file
    from ..preprocessing import Preprocessing

    prep = Preprocessing.from_dict(preprocessing)
    paths = [str(p) for p in batch["path"]]
    pixels = np.zeros((len(paths), 3, size, size), dtype=np.uint8)
    errors = []
    for row, relative in enumerate(paths):
        if is_uri(source):
            if source not in _FILESYSTEMS:
                _FILESYSTEMS[source] = filesystem(source)
            fs, base = _FILESYSTEMS[source]
            absolute = f"{base.rstrip('/')}/{relative}"
            try:
                with fs.open_input_stream(absolute) as stream:
                    data = stream.read()
            except OSError as error:
                errors.append(error_reason(f"{absolute}: {error}", absolute, relative))
                continue
            image, reason, named = *decode_file(data, prep), "image data"
        else:
            absolute = os.path.join(source, relative)
            image, reason, named = *decode_file(absolute, prep), absolute
        if image is None:
            errors.append(error_reason(reason, named, relative))
        else:
            pixels[row] = image.numpy()
            errors.append("")
    return {"index": batch["index"], "path": np.array(paths, dtype=object), "pixels": pixels,
            "error": np.array(errors, dtype=object)}


class CaptionActor:
    """A Ray actor holding one model: loaded once from the checkpoint's bytes, then called with
    decoded batches; returns one JSON record per image, in the local engine's record format.

    Ray Data calls `__call__` from one thread of its own, not the one that ran `__init__`:
    loading runs with one torch thread and only the calling thread computes with
    `threads` (libgomp sleeps between operations once threads hold more OpenMP workers than
    there are cores, which runs the encoder 2x slower; see service/batcher.py)."""

    def __init__(self, *, checkpoint: list, suffix: str, device: str, precision: str, decode: dict, threads: int):
        import ray
        import torch

        from ..api import Captioner
        from ..decoding import DecodeConfig
        from ..runtime.cpu import keep_freed_memory

        torch.set_num_threads(1)
        # It computes in a thread other than the main one, as the service does; unlike the service's, one
        # arena on int8 too (measured: glibc's per-thread arenas gave the actor no more images/s).
        keep_freed_memory(one_arena=True)
        with tempfile.NamedTemporaryFile(prefix="captioner-", suffix=suffix) as handle:
            handle.write(ray.get(checkpoint[0]))
            handle.flush()
            self.model = Captioner.from_checkpoint(handle.name, device=device, precision=precision)
        self.config = DecodeConfig.from_kwargs(**decode)
        self.threads = threads
        self._thread_count_set = False

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        if not self._thread_count_set:
            torch.get_num_threads()  # first adopt the process-wide count, so that the next line sticks
            torch.set_num_threads(self.threads)
            self._thread_count_set = True
        started = time.time()
        paths, errors = [str(p) for p in batch["path"]], [str(e) for e in batch["error"]]
        good = [i for i, error in enumerate(errors) if not error]
        records: list[dict[str, Any] | None] = [None] * len(paths)
        if good:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"][good]))  # (B, 3, S, S) uint8
            for i, result in zip(good, self.model.caption_pixels(pixels, self.config)):
                records[i] = caption_record(paths[i], result)
        for i, error in enumerate(errors):
            if error:
                records[i] = error_record(paths[i], error)
        return {"index": batch["index"],
                "record": np.array([json.dumps(r, ensure_ascii=True) for r in records], dtype=object),
                "started": np.full(len(paths), started)}


# -- shards ----------------------------------------------------------------------------------------


class Shards:
    """OUT.shards/: committed shards, each a JSONL file of complete records in path order."""

    def __init__(self, folder: Location):
        self.folder = folder
        self.committed: list[tuple[int, int, str]] = []  # (run, shard, name), sorted
        self.found = 0  # how many were committed before this run

    def open(self, *, overwrite: bool) -> set[str]:
        """Read the committed shards; return the paths they hold. Leftover temporary files of an
        interrupted run are deleted."""
        if overwrite:
            self.folder.remove()
        for name in self.folder.names():
            match = SHARD_NAME.fullmatch(name)
            if match:
                self.committed.append((int(match.group(1)), int(match.group(2)), name))
            elif name.endswith(".tmp"):
                self.folder.child(name).remove()
        self.committed.sort()
        self.found = len(self.committed)
        return {record["path"] for record in self._read_all()}

    @property
    def next_run(self) -> int:
        return max((run for run, _, _ in self.committed), default=0) + 1

    def _read(self, name: str) -> Iterator[dict[str, Any]]:
        yield from parse_records(self.folder.child(name).read_bytes().splitlines(), self.folder.child(name))

    def _read_all(self) -> Iterator[dict[str, Any]]:
        for _, _, name in self.committed:
            yield from self._read(name)

    def commit(self, run: int, shard: int, records: list[dict[str, Any]]) -> None:
        name = f"part-{run:05d}-{shard:06d}.jsonl"
        self.folder.child(name).write([encode_jsonl(records)])
        self.committed.append((run, shard, name))

    def merged(self) -> Iterator[dict[str, Any]]:
        """Every committed record once, in path order. Within a run, shards are consecutive
        slices of one sorted list; runs are merged, and a path twice keeps its first record."""
        self.committed.sort()
        runs = [itertools.chain.from_iterable(map(self._read, [name for _, _, name in group]))
                for _, group in itertools.groupby(self.committed, key=lambda c: c[0])]
        previous = None
        for record in heapq.merge(*runs, key=lambda r: r["path"]):
            if record["path"] != previous:
                previous = record["path"]
                yield record


def render(fmt: str, out: Location, records: Iterator[dict[str, Any]], keep: list | None) -> None:
    """Write OUT (and for coco its journal) from records in path order, with the local engine's
    encoders; `keep`, when given, collects the records (for the gallery)."""

    def chunks(header: bytes, journal: bool) -> Iterator[bytes]:
        yield header
        while True:
            chunk = list(itertools.islice(records, 1000))
            if not chunk:
                return
            if keep is not None:
                keep.extend(chunk)
            if journal:
                captioned.extend({k: r[k] for k in ("path", "caption", "score")} for r in chunk if "caption" in r)
            yield encode_records(fmt, chunk)

    captioned: list[dict[str, Any]] = []
    if fmt == "coco":
        out.with_suffix(JOURNAL_SUFFIX).write(chunks(b"", journal=True))
        out.write([coco_results(captioned)])
    else:
        out.write(chunks(CSV_HEADER if fmt == "csv" else b"", journal=False))


# -- the command -----------------------------------------------------------------------------------


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data's own dependencies (pyarrow, pandas)
    except ImportError as error:
        raise RuntimeError(f"--engine ray needs Ray Data, which is not installed ({error}); "
                           f"install it with `{INSTALL}`") from None
    return ray


def checkpoint_preprocessing(data: bytes, suffix: str, options: dict[str, Any], *, precision: str):
    """The model's preprocessing, which the decoding tasks need, read in the driver before any
    Ray work, so that a bad checkpoint fails here with its own message. Building the model takes
    seconds (the actors do it), so a .pt checkpoint's record is read as every load reads and checks
    it; the model is built here only for what needs it: an ONNX export, or --force-words (a word the
    model cannot say is refused now, not in an actor's traceback)."""
    from ..api import Captioner
    from ..checkpoint import CheckpointError, load_checkpoint
    from ..decoding import DecodeConfig
    from ..preprocessing import Preprocessing

    with tempfile.NamedTemporaryFile(prefix="captioner-", suffix=suffix) as handle:
        handle.write(data)
        handle.flush()
        if not options.get("force_words"):
            try:
                return Preprocessing.from_dict(load_checkpoint(handle.name)["preprocessing"])
            except CheckpointError:
                pass  # perhaps an ONNX export: from_checkpoint says what it is
        model = Captioner.from_checkpoint(handle.name, device="cpu", precision=precision)
        model.requested_words(DecodeConfig.from_kwargs(**options))
        return model.preprocessing


def object_store_budget(actors: int, batch_size: int, size: int) -> int:
    """Bytes Ray Data may hold in the object store: eight batches of decoded pixels per actor
    (the one it captions and the next ones, ready), at least 32 MB; never the photo count. So
    decoding runs only a little ahead of the models, and memory stays flat (40 MB with one actor
    and batches of 32 gave the throughput of 256 MB on this project's 2-core machine)."""
    return max(32 << 20, 8 * actors * batch_size * 3 * size * size)


class RayEngine:
    """caption-folder's steps on a Ray cluster, for `job.run`: DIR and OUT are local paths or URIs;
    while the work runs OUT is kept as committed shards, and it is rendered from them only once
    nothing is left undone."""

    source: str
    output: str
    writing: str
    image_root: Path

    def check(self, args: argparse.Namespace, options: dict[str, Any]) -> None:
        address = args.address or os.environ.get("RAY_ADDRESS") or "local"
        if address == "local" and "ray" not in sys.modules:
            # A Ray started for this run serves this machine alone: its processes then address each
            # other on the loopback interface (Ray's single-machine mode), not on the network.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        self.ray = _import_ray()
        if args.shard_size < 1:
            raise ValueError("--shard-size must be at least 1")
        if args.actors is not None and args.actors < 1:
            raise ValueError("--actors must be at least 1")
        if args.num_gpus_per_actor < 0 or args.num_cpus_per_actor < 0:
            raise ValueError("--num-cpus-per-actor and --num-gpus-per-actor cannot be negative")
        src, out = Location(args.dir), Location(args.output)
        if args.html and not src.local:
            raise ValueError("--html links the photos from a local page: it needs a local SOURCE folder")
        for name, place in (("OUT", out), ("the gallery", Location(args.html) if args.html else None)):
            if place is not None and inside(place, src):
                raise ValueError(f"{name} ({place}) is inside {src}: nothing is written into the input folder")
        if not src.is_dir():
            raise FileNotFoundError(f"{src} is not a folder")

        checkpoint = Location(args.checkpoint) if args.checkpoint else None
        if checkpoint is None:
            from ..api import DEFAULT_CHECKPOINT

            checkpoint = Location(str(DEFAULT_CHECKPOINT))
        self.checkpoint_bytes = checkpoint.read_bytes()
        self.suffix = os.path.splitext(checkpoint.name)[1]
        self.preprocessing = checkpoint_preprocessing(self.checkpoint_bytes, self.suffix, options,
                                                      precision=args.precision)
        self.args, self.options, self.src, self.out = args, options, src, out
        self.fmt = output_format(args.format, args.output)
        self.shards = Shards(out.with_suffix(SHARDS_SUFFIX))
        self.source, self.output, self.writing = str(src), str(out), str(self.shards.folder)
        self.image_root = Path(src.path)

    def open(self) -> set[str]:
        out = self.out
        if self.args.overwrite:
            out.remove()
            out.with_suffix(JOURNAL_SUFFIX).remove()
        elif out.exists() and not self.shards.folder.exists():
            raise OutputError(f"{out} exists without the shards folder {self.shards.folder.name.rsplit('/', 1)[-1]} "
                              "the ray engine resumes from; choose another output or pass --overwrite")
        return self.shards.open(overwrite=self.args.overwrite)

    def find(self) -> Discovery:
        return find_images_at(self.src, recursive=self.args.recursive, glob=self.args.glob)

    def caption(self, todo: list[str], summary: Summary) -> None:
        from ray.data import ActorPoolStrategy, DataContext, ExecutionResources

        ray, args, source, shards, preprocessing = self.ray, self.args, self.src, self.shards, self.preprocessing
        connected, started_here = _connect(ray, args)
        try:
            cluster = ray.cluster_resources()
            gpus, cpus = args.num_gpus_per_actor, args.num_cpus_per_actor
            actors = args.actors or (max(1, int(cluster.get("GPU", 0) // gpus)) if gpus > 0
                                     else max(1, int(cluster.get("CPU", 1) // (cpus + 1))))
            threads = args.threads_per_actor or (max(1, (os.cpu_count() or 1) // actors) if started_here
                                                 else max(1, math.ceil(cpus)))
            context = DataContext.get_current()
            context.enable_progress_bars = not args.quiet
            context.print_on_execution_start = not args.quiet
            budget = object_store_budget(actors, args.batch_size, preprocessing.size)
            context.execution_options.resource_limits = ExecutionResources(object_store_memory=budget)
            if args.quiet:
                logging.getLogger("ray.data").setLevel(logging.ERROR)

            # Ray gives each actor its GPUs as CUDA_VISIBLE_DEVICES
            device = "cuda" if gpus > 0 and args.device == "cpu" else args.device
            source_name = source.path if source.local else source.name
            blocks = min(math.ceil(len(todo) / args.batch_size), 10_000)
            dataset = (
                ray.data.from_items([{"index": i, "path": p} for i, p in enumerate(todo)], override_num_blocks=blocks)
                .map_batches(decode_images, batch_size=args.batch_size, batch_format="numpy", num_cpus=1,
                             memory=DECODE_TASK_MEMORY,
                             fn_kwargs={"source": source_name, "preprocessing": preprocessing.to_dict(),
                                        "size": preprocessing.size})
                .map_batches(CaptionActor, batch_size=args.batch_size, batch_format="numpy",
                             compute=ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus or None,
                             fn_constructor_kwargs={"checkpoint": [ray.put(self.checkpoint_bytes)],
                                                    "suffix": self.suffix, "device": device,
                                                    "precision": args.precision, "decode": self.options,
                                                    "threads": threads})
            )
            run, size = shards.next_run, args.shard_size
            pending: dict[int, dict[int, dict[str, Any]]] = {}  # shard -> index -> record
            finished: set[int] = set()
            first, wall = None, time.time()
            try:
                for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                    first = min(first or math.inf, float(batch["started"].min()))
                    for index, text in zip(batch["index"].tolist(), batch["record"]):
                        shard = index // size
                        if shard in finished or index in pending.get(shard, ()):
                            continue  # a batch run twice (an actor restarted): keep one record
                        records = pending.setdefault(shard, {})
                        record = records[index] = json.loads(text)
                        if "caption" in record:
                            summary.captioned += 1
                        else:
                            summary.failed += 1
                            summary.failures.append((record["path"], record["error"]))
                        if len(records) == min(size, len(todo) - shard * size):
                            shards.commit(run, shard, [records[i] for i in sorted(records)])
                            del pending[shard]
                            finished.add(shard)
            finally:
                summary.elapsed = time.time() - (first if first is not None else wall)
        except ray.exceptions.RayError as error:
            raise RuntimeError(f"the Ray job failed: {error}\n(the committed shards are kept: run the same command "
                               "again to resume)") from None
        finally:
            if connected:
                ray.shutdown()

    def finish(self, *, complete: bool, keep: list[dict[str, Any]] | None) -> bool:
        if not complete:
            return False  # the committed shards are what a rerun resumes from; OUT waits for all
        captioned_any = False

        def watched() -> Iterator[dict[str, Any]]:
            nonlocal captioned_any
            for record in self.shards.merged():
                captioned_any = captioned_any or "caption" in record
                yield record

        render(self.fmt, self.out, watched(), keep)
        return captioned_any

    def kept(self, summary: Summary) -> str:
        return f"{len(self.shards.committed) - self.shards.found} shards of this run committed to {self.shards.folder}"


def _connect(ray, args: argparse.Namespace) -> tuple[bool, bool]:
    """Connect to the cluster (or start Ray on this machine). Returns (connected here, started here)."""
    if ray.is_initialized():
        return False, False
    address = args.address or os.environ.get("RAY_ADDRESS") or "local"
    settings: dict[str, Any] = dict(address=address, log_to_driver=not args.quiet,
                                    logging_level=logging.ERROR if args.quiet else logging.INFO)
    if address == "local":
        settings.update(num_cpus=os.cpu_count(), include_dashboard=False)
    ray.init(**settings)
    return True, address == "local"
