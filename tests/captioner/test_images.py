"""A corpus of broken and unusual images, made here, through the decoder and preprocessing."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner.images import CorruptImageError, ImageTooLargeError, UnsupportedImageError, open_image
from captioner.preprocessing import Preprocessing


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def test_rejects_non_images_with_415():
    for data in (b"", b"hello, I am text pretending to be a .jpg\n"):
        with pytest.raises(UnsupportedImageError) as error:
            open_image(data)
        assert error.value.status == 415


def test_truncated_jpeg_is_corrupt_400(photo_bytes):
    with pytest.raises(CorruptImageError) as error:
        open_image(photo_bytes[: len(photo_bytes) // 2])
    assert error.value.status == 400


def test_decompression_bomb_is_refused_before_decoding():
    with pytest.raises(ImageTooLargeError) as error:
        open_image(_png_header_only(30000, 30000))
    assert error.value.status == 413
    assert "megapixels" in str(error.value)


def test_unusual_formats_become_rgb():
    rgb = Image.new("RGB", (40, 30), (200, 30, 30))
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    palette.info["transparency"] = 0  # index 0 (red) transparent -> white
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 255, 0), (0, 0, 255))]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    cases = {
        "1x1 png": (_encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), (1, 2, 3)),
        "cmyk jpeg": (_encode(rgb.convert("CMYK"), "JPEG", quality=95), (200, 30, 30)),
        "palette with transparency": (_encode(palette, "PNG"), (255, 255, 255)),
        "animated gif first frame": (gif.getvalue(), (0, 255, 0)),
        "webp": (_encode(rgb, "WEBP", lossless=True), (200, 30, 30)),
        "grayscale": (_encode(Image.new("L", (8, 8), 77), "PNG"), (77, 77, 77)),
    }
    for name, (data, colour) in cases.items():
        image = open_image(data)
        assert image.mode == "RGB", name
        assert np.allclose(np.asarray(image)[0, 0], colour, atol=12), name


def test_sixteen_bit_png_keeps_its_range():
    array = np.full((10, 10), 40000, dtype=np.uint16)  # 61% of full scale
    image = open_image(_encode(Image.fromarray(array), "PNG"))
    assert abs(int(np.asarray(image)[0, 0, 0]) - round(40000 / 65535 * 255)) <= 1


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (60, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    upright = open_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert upright.size == (20, 60)
    assert np.asarray(upright)[:10, :, 0].mean() > 200  # the strip is now on top


def test_preprocessing_squash_and_crop_shapes_and_normalisation(photo_bytes):
    squash = Preprocessing(size=224, resize="squash")
    crop = Preprocessing(size=224, resize="crop", crop_pct=0.875)
    for p in (squash, crop):
        pixels = p.load(photo_bytes)
        assert pixels.shape == (3, 224, 224) and pixels.dtype.__str__() == "torch.uint8"
    white = squash.normalize(squash.from_pil(Image.new("RGB", (10, 10), (255, 255, 255)))[None])
    assert float(white.min()) == pytest.approx(1.0)  # mean = std = 0.5 maps [0, 1] to [-1, 1]
    assert Preprocessing.from_dict(crop.to_dict()) == crop


def test_pixel_limit_is_configurable(photo_bytes):
    with pytest.raises(ImageTooLargeError):
        open_image(photo_bytes, max_pixels=1000)
