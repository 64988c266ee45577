"""Turning untrusted image sources (paths, bytes, PIL images) into RGB PIL images, safely.

Every failure is an `ImageError` subclass carrying the HTTP status a service should answer with,
so the library, the folder command and the HTTP API report bad images the same way.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image]

DEFAULT_MAX_PIXELS = 40_000_000  # decompression-bomb guard: 40 megapixels


class ImageError(ValueError):
    """An image could not be used. `status` is the HTTP status that describes the failure."""

    status = 400


class UnsupportedImageError(ImageError):
    """Not an image, or a format Pillow cannot decode."""

    status = 415


class CorruptImageError(ImageError):
    """Truncated or damaged image data."""

    status = 400


class ImageTooLargeError(ImageError):
    """More pixels than allowed (decompression bombs)."""

    status = 413


def open_image(
    source: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode `source` into an upright 8-bit RGB image.

    EXIF orientation is applied; grayscale, palette, alpha, CMYK and 16-bit images are converted
    (transparency composited on white); animated images give their first frame. `draft_size`
    lets JPEG decoding skip work by decoding at a reduced scale no smaller than that size.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
    else:
        image = _open(source, name, max_pixels)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, "
            f"over the limit of {max_pixels / 1e6:.1f}"
        )
    if draft_size is not None and image.format == "JPEG":
        # DCT-domain downscaling: decodes 2-8x faster; the result stays >= draft_size.
        image.draft("RGB", _oriented_draft_size(image, draft_size))
    try:
        image.load()
        image = ImageOps.exif_transpose(image)
        return _to_rgb(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"{name}: truncated or corrupt image ({error})") from error


def _open(source: ImageSource, name: str, max_pixels: int) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise UnsupportedImageError(f"{name}: empty data, not an image")
        stream: object = io.BytesIO(source)
    elif isinstance(source, (str, os.PathLike)):
        stream = Path(source)
    else:
        raise TypeError(f"cannot read an image from {type(source).__name__}")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit applies; Pillow's warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(stream)  # reads the header only
    except UnidentifiedImageError as error:
        raise UnsupportedImageError(f"{name}: not an image, or an unsupported format") from error
    except Image.DecompressionBombError as error:  # Pillow's own, far higher, limit
        raise ImageTooLargeError(f"{name}: over the limit of {max_pixels / 1e6:.1f} megapixels ({error})") from error
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except OSError as error:
        raise CorruptImageError(f"{name}: {error}") from error


def _oriented_draft_size(image: Image.Image, size: tuple[int, int]) -> tuple[int, int]:
    # EXIF orientations 5-8 swap width and height after transposition.
    orientation = image.getexif().get(0x0112, 1)
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else size


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit grayscale: scale the full range to 8 bits (convert("RGB") would clip to 255).
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image).convert("RGB")
    return image.convert("RGB")


def _describe(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, Image.Image):
        return "image"
    return "image data"
