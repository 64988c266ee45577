"""Image files decoded in DataLoader worker processes, for batch work (feature caches, folders).

A file that cannot be read does not stop the batch: its item carries the error message instead of
pixels, and `collate` keeps it out of the pixel tensor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from ..images import DEFAULT_MAX_PIXELS, ImageError
from ..preprocessing import Preprocessing


@dataclass
class PixelBatch:
    indices: list[int]  # dataset positions of the decoded images, aligned with `pixels`
    pixels: torch.Tensor  # (B, 3, S, S) uint8
    failures: list[tuple[int, str]]  # (dataset position, reason) of images that could not be read


class ImageFileDataset(Dataset):
    """`transform(index, pixels)`, if given, changes each decoded (3, S, S) uint8 image; it must be
    picklable to run in worker processes."""

    def __init__(self, paths: Sequence[str | os.PathLike], preprocessing: Preprocessing,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 transform: Callable[[int, torch.Tensor], torch.Tensor] | None = None):
        self.paths = list(paths)
        self.preprocessing = preprocessing
        self.max_pixels = max_pixels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        pixels, reason = decode_file(self.paths[index], self.preprocessing, self.max_pixels)
        if pixels is None:
            return index, None, reason
        return index, pixels if self.transform is None else self.transform(index, pixels), None


def decode_file(source: str | os.PathLike | bytes, preprocessing: Preprocessing,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[torch.Tensor | None, str | None]:
    """One image file (a path, or the bytes of a file) -> ((3, S, S) uint8, None), or (None, why)
    when it cannot be read: the one decoding step, and the one guard, of every batch job (folders
    on either engine, feature caches). No file fails the job: an exception the decoder did not
    expect (a codec's own error) becomes that file's reason too."""
    name = "image data" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        return preprocessing.load(source, max_pixels=max_pixels), None
    except ImageError as error:
        return None, str(error)
    except OSError as error:
        return None, f"{name}: {error}"
    except Exception as error:  # noqa: BLE001 - a night-long job outlives one odd file
        return None, f"{name}: cannot decode ({type(error).__name__}: {error})"


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> PixelBatch:
    good = [(i, p) for i, p, _ in items if p is not None]
    size = good[0][1].shape[-1] if good else 0
    pixels = torch.stack([p for _, p in good]) if good else torch.empty(0, 3, size, size, dtype=torch.uint8)
    return PixelBatch([i for i, _ in good], pixels, [(i, e) for i, _, e in items if e is not None])


def pixel_loader(dataset: ImageFileDataset, *, batch_size: int, workers: int,
                 prefetch_batches: int = 4) -> DataLoader:
    """Batches in dataset order; decoding overlaps the model when workers > 0.

    Each worker decodes whole batches with one thread and a lower scheduling priority
    (`_init_worker`): the model in the main process keeps its intra-op threads, workers never
    oversubscribe the cores with their own thread pools, and where the model's threads keep every
    core busy, decoding runs in the gaps they leave (the decoder's word steps use one core) instead
    of preempting them. When the model starves for images, the workers get the cores anyway.
    `prefetch_batches` is how many batches each worker may decode ahead."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, persistent_workers=False, worker_init_fn=_init_worker,
                      prefetch_factor=prefetch_batches if workers > 0 else None)


WORKER_NICENESS = 10  # CFS weight about 1/10 of the model's threads while both want a core


def _init_worker(worker_id: int) -> None:
    torch.set_num_threads(1)
    try:
        os.nice(WORKER_NICENESS)
    except OSError:  # not permitted (some containers): decode at normal priority
        pass
