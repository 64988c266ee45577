"""What both engines do alike around their work: check the arguments before any of it, count what
happened (`Summary`), and end with the summary and the exit status (`report`, `output_failed`).

Exit status: 0 when at least one image has a caption in OUT, 1 when nothing could be captioned
(no image found, or every one failed), 2 when OUT cannot be written or the arguments are wrong,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..arguments import decode_options
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


def output_failed(error: Exception, target: object = "the output") -> int:
    """Say why the output could not be written (an `OutputError` says it all, an OSError names the
    file) -> exit status 2, for both engines."""
    detail = str(error) if isinstance(error, OutputError) else f"cannot write {target}: {error}"
    print(f"captioner caption-folder: {detail}", file=sys.stderr)
    return 2
