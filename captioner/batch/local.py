"""caption-folder's local engine: this machine's processes caption a local folder into a local file.

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
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from .job import Summary, check_arguments, output_failed, report
from .listing import find_images, path_inside
from .records import OutputError, caption_record, error_reason, error_record, output_format
from .storage import STORES, JsonlStore


def run(args: argparse.Namespace) -> int:
    from ..api import Captioner
    from ..decoding import DecodeConfig

    if "://" in args.dir or "://" in args.output:
        raise ValueError("a URI for DIR or OUT needs --engine ray (the local engine reads and writes local files)")
    root, output = Path(args.dir), Path(args.output)
    fmt = output_format(args.format, args.output)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    for name, path in (("OUT", output), ("the gallery", Path(args.html) if args.html else None)):
        if path is not None and path_inside(path, root):
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
            model = (Captioner.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
                     if args.checkpoint else Captioner.default(device=args.device, precision=args.precision))
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
