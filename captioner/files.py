"""Writing a file atomically: readers see the old file or the whole new one, never a part.

The one guarantee, for every file the project writes whole (checkpoints, caches, results, pages):
the data goes to a temporary file in the target's own folder (so the rename never crosses a file
system), is flushed and fsynced, then `os.replace`d onto the target, and the folder is fsynced so
the rename survives a power loss. On any error, Ctrl-C included, the temporary file is removed and
the target is left as it was. Temporary names are unique, so writers racing for one target (two
workers building one cache entry) each replace it with a whole file. The target's folder is made
if missing, and the file gets the permissions of any file the user creates (umask), not 0600.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside PATH for the caller to write (by any means: `torch.save`, a numpy
    memmap); on leaving the block without an error it becomes PATH, as the module says."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    temporary = Path(name)
    try:
        try:
            os.fchmod(descriptor, 0o666 & ~_umask())
        finally:
            os.close(descriptor)
        yield temporary
        with open(temporary, "rb") as handle:  # what the caller wrote, on disk before the rename
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it back (the only
    portable way) would briefly change it for every thread of the process."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # elsewhere: the safe value while it is read
    os.umask(umask)
    return umask


def write_atomically(path: str | os.PathLike, data: bytes | str | Iterable[bytes]) -> None:
    """Write `data` (bytes, UTF-8 text, or chunks of bytes) to PATH atomically."""
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        if isinstance(data, str):
            data = data.encode("utf-8", errors="surrogateescape")
        for chunk in [data] if isinstance(data, bytes) else data:
            handle.write(chunk)


def fsync_directory(folder: str | os.PathLike) -> None:
    """Make a folder's entries (a file created or renamed in it) durable; a no-op where the file
    system cannot open or sync a folder."""
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
