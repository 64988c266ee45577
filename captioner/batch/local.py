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

from .job import Summary
from .listing import Discovery, find_images, path_inside
from .records import caption_record, error_reason, error_record, output_format
from .storage import STORES


class LocalEngine:
    """caption-folder's steps on this machine, for `job.run`: OUT is a local store (`storage`),
    appended to batch by batch, and ended (for coco: its results rendered) even when interrupted."""

    source: str
    output: str
    writing: str
    image_root: Path

    def check(self, args: argparse.Namespace, options: dict[str, Any]) -> None:
        from ..decoding import DecodeConfig

        if "://" in args.dir or "://" in args.output:
            raise ValueError("a URI for DIR or OUT needs --engine ray (the local engine reads and writes local files)")
        root, output = Path(args.dir), Path(args.output)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder")
        for name, path in (("OUT", output), ("the gallery", Path(args.html) if args.html else None)):
            if path is not None and path_inside(path, root):
                raise ValueError(f"{name} ({path}) is inside {root}: nothing is written into the input folder")
        self.args, self.root, self.config = args, root, DecodeConfig.from_kwargs(**options)
        self.store = STORES[output_format(args.format, args.output)](output)
        self.source, self.output = str(root), str(output)
        self.writing, self.image_root = self.output, root.resolve()

    def open(self) -> set[str]:
        self.store.open(overwrite=self.args.overwrite)
        return {r["path"] for r in self.store.records}

    def find(self) -> Discovery:
        return find_images(self.root, recursive=self.args.recursive, glob=self.args.glob)

    def caption(self, todo: list[str], summary: Summary) -> None:
        from ..api import Captioner

        args = self.args
        model = (Captioner.from_checkpoint(args.checkpoint, device=args.device, precision=args.precision)
                 if args.checkpoint else Captioner.default(device=args.device, precision=args.precision))
        start = time.perf_counter()  # throughput counts captioning, not loading the model
        try:
            self._caption_all(model, todo, summary)
        finally:
            summary.elapsed = time.perf_counter() - start

    def finish(self, *, complete: bool, keep: list[dict[str, Any]] | None) -> bool:
        self.store.finish()  # what an interrupted run wrote is OUT as a rerun resumes it
        if keep is not None:
            keep.extend(self.store.records)
        return any("caption" in r for r in self.store.records)

    def kept(self, summary: Summary) -> str:
        return f"{summary.captioned + summary.failed} images written to {self.output}"

    def _caption_all(self, model, todo: list[str], summary: Summary) -> None:
        from tqdm import tqdm

        from .imageset import ImageFileDataset, pixel_loader

        args = self.args
        absolute = [os.path.join(self.root, p) for p in todo]
        dataset = ImageFileDataset(absolute, model.preprocessing)
        loader = pixel_loader(dataset, batch_size=args.batch_size, workers=args.workers)
        with tqdm(total=len(todo), unit="img", disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                  smoothing=0.1) as bar:
            for batch in loader:
                records: dict[int, dict[str, Any]] = {}
                if batch.indices:
                    for index, result in zip(batch.indices, model.caption_pixels(batch.pixels, self.config)):
                        records[index] = caption_record(todo[index], result)
                for index, reason in batch.failures:
                    records[index] = error_record(todo[index], error_reason(reason, absolute[index], todo[index]))
                    summary.failures.append((todo[index], records[index]["error"]))
                self.store.append([records[i] for i in sorted(records)])  # one write + fsync per batch
                summary.captioned += len(batch.indices)
                summary.failed += len(batch.failures)
                bar.update(len(records))
                if summary.failed:
                    bar.set_postfix(failed=summary.failed, refresh=False)
