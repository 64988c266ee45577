"""Inference apart from HTTP (TorchServe's handler contract), testable without a server:

    handler = CaptionHandler(model, max_pixels=...)
    pixels = handler.preprocess([jpeg_bytes, png_bytes])   # (B, 3, S, S) uint8; raises ImageError
    results = handler.infer(pixels, DecodeConfig(...))    # list[CaptionResult]
    handler.postprocess(results, attention=True)           # list[dict], JSON-ready

Shapes: B images, S input side, T generated tokens (words, then <eos> when finished), H' x W' the
encoder's feature grid.
"""

from __future__ import annotations

import io
import math
import time
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from captioner.api import Captioner, CaptionResult
from captioner.decoding import DecodeConfig

from .batcher import MicroBatcher


class CaptionHandler:
    def __init__(self, model: Captioner, *, max_pixels: int):
        self.model = model
        self.max_pixels = max_pixels

    @property
    def model_id(self) -> str:
        sha = self.model.checkpoint_sha256
        return f"captioner-{self.model.encoder.config.backbone}-{sha[:12] if sha else 'unsaved'}"

    def preprocess_one(self, data: bytes) -> torch.Tensor:
        """Untrusted bytes -> (3, S, S) uint8. Raises an `ImageError` subclass (with `.status`)."""
        return self.model.load_pixels(bytes(data), max_pixels=self.max_pixels)

    def preprocess(self, images: Sequence[bytes]) -> torch.Tensor:
        return torch.stack([self.preprocess_one(data) for data in images])  # (B, 3, S, S)

    def infer(self, pixels: torch.Tensor, config: DecodeConfig) -> list[CaptionResult]:
        return self.model.caption_pixels(pixels, config)

    def postprocess(self, results: Sequence[CaptionResult], *, attention: bool = False) -> list[dict[str, Any]]:
        return [result.to_dict(attention=attention) for result in results]

    def warmup(self, batcher: MicroBatcher) -> None:
        """One short caption of a grey image through `batcher` (first-call allocations, lazy inits)."""
        size = self.model.preprocessing.size
        pixels = torch.full((3, size, size), 128, dtype=torch.uint8)
        batcher.submit([pixels], DecodeConfig(max_new_tokens=3), deadline=time.monotonic() + 300)[0].wait()


# -- attention heat maps as a PNG ---------------------------------------------------------------

def attention_png(pixels: torch.Tensor, result: CaptionResult, *, columns: int = 5) -> bytes:
    """pixels (3, S, S) uint8 and the best caption's attention -> PNG: the image, then one panel per
    generated word with its attention map (upsampled bilinearly, normalised per word) over it."""
    caption = result.sequences[0]
    if caption.attention is None:
        raise ValueError("this model has no attention to draw")
    base = Image.fromarray(pixels.permute(1, 2, 0).numpy())  # (S, S, 3)
    size = base.size[0]
    maps = caption.attention[: len(caption.words)].float()  # (T_words, H', W')
    panels = [(base, "(input)")]
    if len(maps):
        upsampled = torch.nn.functional.interpolate(maps[:, None], size=(size, size), mode="bilinear",
                                                    align_corners=False)[:, 0]  # (T, S, S)
        for word, heat in zip(caption.words, upsampled):
            heat = heat - heat.min()
            heat = heat / heat.max().clamp(min=1e-8)
            colour = Image.fromarray(_colormap(heat.numpy()))
            panels.append((Image.blend(base, colour, 0.5), word))
    label_h = 18
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    sheet = Image.new("RGB", (columns * size, rows * (size + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (panel, label) in enumerate(panels):
        x, y = (index % columns) * size, (index // columns) * (size + label_h)
        sheet.paste(panel, (x, y))
        draw.text((x + 4, y + size + 3), label, fill="black", font=font)
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1], (H, W) -> (H, W, 3) uint8, blue (low) to red (high), like 'jet'."""
    v = np.clip(values, 0, 1)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([red, green, blue], axis=-1) * 255).astype(np.uint8)
