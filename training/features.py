"""Feature cache: with a frozen encoder, every image is encoded once.

Region features are stored as fp16 in a memory-mapped `.npy` of shape (N, P, E), with a JSON index
of the image paths. The cache folder is keyed by the backbone, a fingerprint of its weights, the
preprocessing, the image list and the view, so changing any of them builds a new cache instead of
silently reusing a stale one. Files are written atomically (`captioner.files`), the index last.

Augmentation with a frozen encoder: view 0 is each image as preprocessed; views 1.. are fixed
light augmentations of it (`SeededAugment`), each cached like view 0. `FeatureViews` then gives
each image of a training batch one of its views at random.

Fine-tuning the encoder's last stages: with `split=N` the cache holds what the frozen part of the
trunk gives the first of its last N stages (`Encoder.split`), e.g. (N, 49, 192) before
EfficientNet-Lite0's last block, keyed by N and the frozen part's weights only (so never a
full-feature cache, and still valid while the top is being trained); training then runs only the
top on it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from captioner.batch.imageset import ImageFileDataset, pixel_loader
from captioner.encoder import Encoder
from captioner.files import atomic_path, write_atomically
from captioner.preprocessing import Preprocessing

from .augment import AUGMENT_VERSION, SeededAugment

log = logging.getLogger(__name__)
CACHE_VERSION = 1


def weights_fingerprint(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_key(encoder: Encoder, preprocessing: Preprocessing, paths: Sequence[Path], view: int = 0,
              split: int = 0) -> str:
    description: dict = {
        "version": CACHE_VERSION,
        "backbone": encoder.config.backbone,
        "weights": weights_fingerprint(encoder.split(split)[0] if split else encoder),
        "preprocessing": preprocessing.to_dict(),
        "images": [str(Path(p).resolve()) for p in paths],
    }
    if view:  # view 0 keeps the key it had before views existed
        description["view"] = [view, AUGMENT_VERSION]
    if split:  # the frozen trunk's output, before the last `split` stages
        description["split"] = split
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


class FeatureCache:
    """Read side: `regions(i)` is image i's (P, E) fp16 array; `valid[i]` is False for images that
    could not be read when the cache was built."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = json.loads((folder / "index.json").read_text())
        self.paths: list[str] = index["paths"]
        self.valid = np.asarray(index["valid"], dtype=bool)
        self._row = {str(Path(p).resolve()): i for i, p in enumerate(self.paths)}
        self.array = np.load(folder / "regions.npy", mmap_mode="r")  # (N, P, E) fp16

    def row(self, path: str | os.PathLike) -> int:
        return self._row[str(Path(path).resolve())]

    def usable(self, path: str | os.PathLike) -> bool:
        return bool(self.valid[self.row(path)])

    def regions(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """(B, P, E) float32 features of the given images."""
        rows = [self.row(p) for p in paths]
        return torch.from_numpy(np.stack([self.array[r] for r in rows]).astype(np.float32))


class CacheUnion:
    """The caches of several data sets read as one: each image from the cache that holds it."""

    def __init__(self, caches: Sequence[FeatureCache]):
        self._owner = {key: cache for cache in caches for key in cache._row}

    def _cache(self, path: str | os.PathLike) -> FeatureCache:
        return self._owner[str(Path(path).resolve())]

    def usable(self, path: str | os.PathLike) -> bool:
        return self._cache(path).usable(path)

    def regions(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """(B, P, E) float32 features of the given images."""
        return torch.cat([self._cache(p).regions([p]) for p in paths])


class FeatureViews:
    """Several cached views of the same images; an image is usable if every view could read it."""

    def __init__(self, views: Sequence[FeatureCache | CacheUnion]):
        self.views = list(views)

    def usable(self, path: str | os.PathLike) -> bool:
        return all(view.usable(path) for view in self.views)

    def regions(self, paths: Sequence[str | os.PathLike], generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, P, E) float32: view 0 without a generator, else a random view per image."""
        if generator is None or len(self.views) == 1:
            return self.views[0].regions(paths)
        picks = torch.randint(0, len(self.views), (len(paths),), generator=generator).tolist()
        return torch.cat([self.views[v].regions([p]) for v, p in zip(picks, paths)])


def build_or_load(
    encoder: Encoder,
    preprocessing: Preprocessing,
    paths: Sequence[Path],
    cache_root: str | os.PathLike,
    *,
    batch_size: int = 32,
    workers: int = 2,
    progress: bool = True,
    view: int = 0,
    split: int = 0,
) -> FeatureCache:
    """The cached regions (N, P, E) of `paths` as `view`, or with `split=N` the frozen trunk's
    output before the encoder's last N stages, flattened to (N, h*w, C)."""
    folder = Path(cache_root) / cache_key(encoder, preprocessing, paths, view, split)
    if (folder / "index.json").is_file():
        log.info("feature cache hit: %s", folder)
        return FeatureCache(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then read its result
        if (folder / "index.json").is_file():
            return FeatureCache(folder)
        started = time.monotonic()
        _build(encoder, preprocessing, paths, folder, batch_size, workers, progress, view, split)
        log.info("feature cache built in %.0f s: %s", time.monotonic() - started, folder)
    return FeatureCache(folder)


def _build(encoder: Encoder, preprocessing: Preprocessing, paths: Sequence[Path], folder: Path,
           batch_size: int, workers: int, progress: bool, view: int, split: int) -> None:
    encoder = encoder.eval()
    device = next(encoder.parameters()).device
    def encode(pixels: torch.Tensor) -> torch.Tensor:  # (B, P, E), or with a split (B, h*w, C)
        return encoder.extract_frozen(pixels, split) if split else encoder.extract(pixels)[0]

    dataset = ImageFileDataset(paths, preprocessing, transform=SeededAugment(view) if view else None)
    valid = np.zeros(len(paths), dtype=bool)
    array = None
    failures = []
    description = "encoding images" + (f" up to the last {split} stages" if split else "")
    description += f" (view {view})" if view else ""
    with atomic_path(folder / "regions.npy") as temporary, \
            tqdm(total=len(paths), desc=description, unit="img", disable=not progress) as bar:
        for batch in pixel_loader(dataset, batch_size=batch_size, workers=workers):
            failures.extend(batch.failures)
            if batch.indices:
                regions = encode(preprocessing.normalize(batch.pixels.to(device)))  # (B, P, E) or (B, h*w, C)
                if array is None:
                    shape = (len(paths), *regions.shape[1:])  # (N, P, E)
                    array = np.lib.format.open_memmap(temporary, mode="w+", dtype=np.float16, shape=shape)
                array[batch.indices] = regions.to(torch.float16).cpu().numpy()
                valid[batch.indices] = True
            bar.update(len(batch.indices) + len(batch.failures))
        if array is None:
            raise ValueError("no image could be read; nothing to cache")
        array.flush()
        del array
    for index, reason in failures:
        log.warning("unreadable image skipped: %s", reason)
    # Written last: its presence is what marks the cache complete.
    index = {"paths": [str(p) for p in paths], "valid": valid.tolist(), "failures": [r for _, r in failures]}
    write_atomically(folder / "index.json", json.dumps(index))

