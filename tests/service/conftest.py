"""Service fixtures: apps built with `create_app({...})` on the tiny checkpoint (never the bundled
model) at precision fp32, and a corpus of broken and unusual images made here."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Iterator

import numpy as np
import pytest
from flask import Flask
from PIL import Image

from service import create_app
from tests.conftest import make_photo


def build_app(checkpoint: str, **settings) -> Flask:
    # fp32 as tiny_captioner, whose captions the tests compare; settings may override these
    return create_app({"checkpoint": checkpoint, "torch_threads": 1, "precision": "fp32", **settings})


@pytest.fixture(scope="session")
def app(tiny_checkpoint: str) -> Iterator[Flask]:
    application = build_app(tiny_checkpoint, max_wait_ms=2.0)
    yield application
    application.extensions["captioner"].close()


@pytest.fixture
def client(app: Flask):
    return app.test_client()


@pytest.fixture
def make_app(tiny_checkpoint: str):
    """An app with its own settings, closed after the test."""
    made: list[Flask] = []

    def make(**settings) -> Flask:
        made.append(build_app(settings.pop("checkpoint", tiny_checkpoint), **settings))
        return made[-1]

    yield make
    for application in made:
        application.extensions["captioner"].close()


def assert_problem(response, status: int) -> dict:
    assert response.status_code == status, response.data[:500]
    assert response.mimetype == "application/problem+json"
    body = response.get_json(force=True)
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body


# -- the corpus ---------------------------------------------------------------------------------

def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny (wrong) IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + _png_chunk(b"IEND", b""))


def exif_rotated_photo() -> tuple[bytes, Image.Image]:
    """A 320x240 JPEG tagged orientation 6 (rotate 90° clockwise to view): upright it is 240x320."""
    photo = Image.open(io.BytesIO(make_photo(320, 240, seed=3)))
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(photo, "JPEG", exif=exif.tobytes(), quality=95)
    return data, photo.transpose(Image.Transpose.ROTATE_270)


def corpus() -> dict[str, tuple[bytes, int]]:
    """name -> (bytes, the HTTP status the API must answer)."""
    rng = np.random.default_rng(0)
    photo = Image.open(io.BytesIO(make_photo(96, 64, seed=1)))
    sixteen = Image.fromarray((rng.integers(0, 65535, (40, 50))).astype(np.uint16))
    if sixteen.mode != "I;16":
        sixteen = sixteen.convert("I;16")
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "green", "blue")]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    jpeg = make_photo(160, 120, seed=2)
    return {
        "zero_bytes": (b"", 415),
        "text_named_jpg": (b"this is not a picture, just text in a file called photo.jpg\n", 415),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], 400),
        "one_pixel_png": (_encode(Image.new("RGB", (1, 1), "white"), "PNG"), 200),
        "sixteen_bit_png": (_encode(sixteen, "PNG"), 200),
        "cmyk_jpeg": (_encode(photo.convert("CMYK"), "JPEG"), 200),
        "palette_transparency_png": (_encode(palette, "PNG", transparency=0), 200),
        "animated_gif": (gif.getvalue(), 200),
        "webp": (_encode(photo, "WEBP"), 200),
        "png_header_30000x30000": (png_header_only(30000, 30000), 413),
        "exif_rotated_jpeg": (exif_rotated_photo()[0], 200),
    }


@pytest.fixture(scope="session")
def broken_images() -> dict[str, tuple[bytes, int]]:
    return corpus()


@pytest.fixture(scope="session")
def fuzz_schema(app: Flask):
    import schemathesis

    return schemathesis.openapi.from_wsgi("/openapi.json", app)


@pytest.fixture(scope="session")
def other_checkpoint(encoder, vocab, tmp_path_factory) -> str:
    """A second tiny model (another random decoder): other captions, another SHA-256."""
    import torch

    from captioner.api import Captioner
    from captioner.decoder import Decoder
    from captioner.preprocessing import Preprocessing
    from tests.conftest import tiny_decoder_config

    torch.manual_seed(1)
    decoder = Decoder(tiny_decoder_config(len(vocab), feature_dim=encoder.feature_dim))
    model = Captioner(encoder, decoder, vocab, Preprocessing(size=224, resize="squash"),
                      provenance={"note": "other test model"}, precision="fp32")
    path = tmp_path_factory.mktemp("checkpoints") / "other.pt"
    model.save(path)
    return str(path)
