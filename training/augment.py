"""Light photometric and geometric augmentation, for encoder fine-tuning and cached feature views."""

from __future__ import annotations

import torch
import torchvision.transforms.v2.functional as tvf

AUGMENT_VERSION = 1  # part of cached views' keys: bump it when light_augment changes


def light_augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(3, S, S) uint8 -> a random 85-100 % crop resized back, with +-10 % brightness and
    contrast. No flips: they would swap "left" and "right" in the captions."""
    size = pixels.shape[-1]
    scale, brightness, contrast = (0.85 + 0.15 * torch.rand(1, generator=generator).item(),
                                   0.9 + 0.2 * torch.rand(1, generator=generator).item(),
                                   0.9 + 0.2 * torch.rand(1, generator=generator).item())
    side = max(1, round(size * scale))
    top, left = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for _ in range(2))
    pixels = tvf.resized_crop(pixels, top, left, side, side, [size, size], antialias=True)
    pixels = tvf.adjust_brightness(pixels, brightness)
    return tvf.adjust_contrast(pixels, contrast)


class SeededAugment:
    """Picklable transform for DataLoader workers: image i of view v always gets the same
    augmentation, so a cache view can be rebuilt identically."""

    def __init__(self, view: int):
        self.view = view

    def __call__(self, index: int, pixels: torch.Tensor) -> torch.Tensor:
        return light_augment(pixels, torch.Generator().manual_seed(self.view * 1_000_003 + index))
