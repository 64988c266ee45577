"""caption-folder's one command skeleton, `run(args, engine)`, and what it counts and says.

`run` makes the steps every engine shares, in this order: check the arguments, let the engine
check its own and the paths (`Engine.check`), open OUT to resume it (`open`), list DIR (`find`),
leave out what OUT already holds, caption the rest (`caption`), end OUT (`finish`), write the
gallery, and end with the summary and the exit status. An engine (`local.LocalEngine`,
`ray_engine.RayEngine`) supplies only what differs: where the files are, how OUT is kept while
the work runs, and what runs the model.

Exit status: 0 when at least one image has a caption in OUT, 1 when nothing could be captioned
(no image found, or every one failed), 2 when OUT cannot be written or the arguments are wrong,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..arguments import decode_options
from .listing import Discovery
from .records import OutputError


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


class Engine(Protocol):
    """What differs between engines. `run` calls each step once, in the order below (`caption`
    only when something is left to do); `check` sets the attributes."""

    source: str  # DIR, as messages name it
    output: str  # OUT, as messages name it
    writing: str  # what `caption` writes into as it goes, named when that fails
    image_root: Path  # the local folder whose photos the gallery links

    def check(self, args: argparse.Namespace, options: dict[str, Any]) -> None:
        """Check the engine's own arguments and the paths, and read what the work needs; nothing
        is written yet. A mistake raises ValueError, FileNotFoundError or RuntimeError."""

    def open(self) -> set[str]:
        """Open OUT to resume it (with --overwrite: to start afresh); the paths it already holds.
        Raises OSError or OutputError when OUT cannot be used."""

    def find(self) -> Discovery:
        """DIR's images, sorted, and what was skipped."""

    def caption(self, todo: list[str], summary: Summary) -> None:
        """Caption `todo` into OUT, keeping every finished part for a rerun, and count in
        `summary` (its elapsed time too)."""

    def finish(self, *, complete: bool, keep: list[dict[str, Any]] | None) -> bool:
        """End OUT; `complete` when nothing was left undone, else keep what a rerun resumes from.
        Adds OUT's records to `keep`, when given; returns whether one of them has a caption."""

    def kept(self, summary: Summary) -> str:
        """What an interrupted run has kept, for the message that says how to finish it."""


def run(args: argparse.Namespace, engine: Engine) -> int:
    engine.check(args, check_arguments(args))
    try:
        done = engine.open()
    except (OSError, OutputError) as error:
        return output_failed(error, engine.output)
    found = engine.find()
    todo = [p for p in found.images if p not in done]
    summary = Summary(skipped=len(found.skipped), already_done=len(found.images) - len(todo))
    interrupted = False
    try:
        if todo:
            engine.caption(todo, summary)
    except KeyboardInterrupt:
        interrupted = True
    except OSError as error:
        engine.finish(complete=False, keep=None)
        return output_failed(error, engine.writing)
    gallery = Path(args.html) if args.html and not interrupted else None
    records: list[dict[str, Any]] | None = [] if gallery is not None else None
    try:
        captioned_any = engine.finish(complete=not interrupted, keep=records)
        if gallery is not None:
            from .gallery import write_gallery

            write_gallery(records, engine.image_root, gallery, title=f"Captions of {engine.image_root.name}")
    except (OSError, OutputError) as error:
        return output_failed(error)
    return report(args, summary, found_any=bool(found.images), captioned_any=captioned_any,
                  interrupted=interrupted, output=engine.output, source=engine.source,
                  written=engine.kept(summary))


def check_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """The checks every engine needs before any work; returns the decoding options."""
    from ..decoding import DecodeConfig

    if args.batch_size < 1 or args.workers < 0:
        raise ValueError("--batch-size must be at least 1 and --workers at least 0")
    options = decode_options(args)
    DecodeConfig.from_kwargs(**options)  # bad options fail before the model loads
    return options


def report(args: argparse.Namespace, summary: Summary, *, found_any: bool, captioned_any: bool,
           interrupted: bool, output: str, source: str, written: str) -> int:
    """The summary on stderr and the exit status; `written` says what an interrupted run kept."""
    if not args.quiet:
        print(summary.describe(output), file=sys.stderr)
    if interrupted:
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


def output_failed(error: Exception, target: object = "the output") -> int:
    """Say why the output could not be written (an `OutputError` says it all, an OSError names the
    file) -> exit status 2."""
    detail = str(error) if isinstance(error, OutputError) else f"cannot write {target}: {error}"
    print(f"captioner caption-folder: {detail}", file=sys.stderr)
    return 2
