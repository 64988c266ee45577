"""Which files of a folder are images: `find_images` lists them, sorted, and says what it skipped.

Image files are picked by extension, and files with another extension (or none) by their first
bytes (`sniff_image`); hidden files, non-images and non-regular files are skipped. Directory
symlinks are followed once: a loop is detected by (device, inode). The rules are written once
(`hidden`, `Discovery.add_file`); two walkers apply them: `find_images` to a local folder (both
engines) and the Ray engine's `find_images_at` to an object store's listing.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# Extensions that name an image format; such files always get a record (a caption or an error).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".gif", ".bmp", ".dib", ".tif", ".tiff",
    ".webp", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".jpx", ".avif",
    ".heic", ".heif", ".qoi", ".pcx",
})


@dataclass
class Discovery:
    images: list[str] = field(default_factory=list)  # paths relative to DIR, posix style, sorted
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, why)

    def add_file(self, relative: str, *, glob: str | None, regular: bool, sniff: Callable[[], bool],
                 link: bool = False) -> None:
        """The rule for an entry that is not a folder (nor hidden): files `glob` does not match are
        left out silently; a regular file is an image by its extension, else by its first bytes
        (`sniff`, read only then); a link that reads as no file but has an image's extension is
        listed, so that reading it gives an error record; anything else is skipped, with why."""
        if glob and not glob_match(glob, relative):
            return
        image_name = os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS
        if regular:
            if image_name or sniff():
                self.images.append(relative)
            else:
                self.skipped.append((relative, "not an image"))
        elif image_name and link:
            self.images.append(relative)
        else:
            self.skipped.append((relative, "not a regular file"))

    def sort(self) -> "Discovery":
        self.images.sort()
        self.skipped.sort()
        return self


def hidden(name: str) -> bool:
    """A hidden file or folder (the folder with all it holds) is skipped."""
    return name.startswith(".")


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
            if hidden(entry.name):
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
            found.add_file(relative, glob=glob, regular=is_file, link=entry.is_symlink(),
                           sniff=lambda path=entry.path: _sniff_file(path))
    return found.sort()


def glob_match(pattern: str, relative: str) -> bool:
    target = relative if "/" in pattern else relative.rsplit("/", 1)[-1]
    return fnmatch.fnmatchcase(target.lower(), pattern.lower())


def _sniff_file(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            return sniff_image(handle.read(32))
    except OSError:
        return False


def path_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents
