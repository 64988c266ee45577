"""How an image becomes the encoder's input; stored in every checkpoint and used identically by
training, the library, the folder command and the service.

Two stages, so that decoding can run in worker processes and only uint8 pixels cross to the model:
`load()` gives a (3, S, S) uint8 tensor; `normalize()` turns a (B, 3, S, S) uint8 batch into the
float input of the backbone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from .images import DEFAULT_MAX_PIXELS, ImageSource, open_image

RESIZE_MODES = ("squash", "crop")
_PIL_INTERPOLATION = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class Preprocessing:
    """`squash` resizes the whole image to S x S (keeps the whole scene, as Show, Attend and Tell
    does); `crop` resizes the short side to S / crop_pct and takes the centre S x S (ImageNet
    evaluation style)."""

    size: int = 224
    resize: str = "squash"
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, not {self.resize!r}")
        if self.interpolation not in _PIL_INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_INTERPOLATION)}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "Preprocessing":
        return cls(**data)

    @property
    def _resize_size(self) -> int:
        return self.size if self.resize == "squash" else int(round(self.size / self.crop_pct))

    def load(self, source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """Decode and resize one image: (3, S, S) uint8."""
        side = self._resize_size
        return self.from_pil(open_image(source, max_pixels=max_pixels, draft_size=(side, side)))

    def from_pil(self, image: Image.Image) -> torch.Tensor:
        """Resize an RGB PIL image: (3, S, S) uint8."""
        resample = _PIL_INTERPOLATION[self.interpolation]
        if self.resize == "squash":
            image = image.resize((self.size, self.size), resample)
        else:
            side = self._resize_size
            width, height = image.size
            scale = side / min(width, height)
            new_w, new_h = max(side, round(width * scale)), max(side, round(height * scale))
            image = image.resize((new_w, new_h), resample)
            left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(image, dtype=np.uint8)  # (S, S, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def from_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """Resize a user tensor, (3, H, W) uint8 in [0, 255] or float in [0, 1]: (3, S, S) uint8."""
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"an image tensor must be (3, H, W), got {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        elif image.dtype != torch.uint8:
            raise ValueError(f"an image tensor must be uint8 or float, not {image.dtype}")
        array = image.permute(1, 2, 0).cpu().numpy()
        return self.from_pil(Image.fromarray(array, mode="RGB"))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) uint8 -> (B, 3, S, S) float, normalised with the backbone's mean/std."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) * 255.0
        return (pixels.float() - mean) / std
