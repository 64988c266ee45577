"""`captioner caption-folder DIR -o OUT`: caption every image of a folder, batched and resumable.

    captioner caption-folder photos/ -o captions.jsonl --recursive --html gallery.html

One skeleton runs this command (`job.run`) with one of two engines: the local one (`local.py`),
or `--engine ray` (`ray_engine.py`, on a Ray cluster). Both list with `listing.py`, build records
with `caption_record` / `error_record` and write them with `encode_records` and `coco_results`
(`records.py`): one record format for every engine. Nothing is ever written into DIR: OUT and the
gallery must lie outside it. Ray is imported only when `--engine ray` runs.
"""

from __future__ import annotations

import argparse

from ..arguments import add_decode_arguments, add_model_arguments
from . import job, local, ray_engine
from .records import FORMATS


def register(commands) -> None:
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


def run(args: argparse.Namespace) -> int:
    engine = ray_engine.RayEngine() if args.engine == "ray" else local.LocalEngine()
    return job.run(args, engine)
