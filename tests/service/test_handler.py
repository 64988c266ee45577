"""The inference handler without HTTP: preprocess -> infer -> postprocess."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from captioner.decoding import DecodeConfig
from captioner.images import UnsupportedImageError
from service.handler import CaptionHandler, attention_png
from tests.conftest import make_photo


def test_handler_round_trip_matches_the_library(tiny_captioner):
    handler = CaptionHandler(tiny_captioner, max_pixels=10**7)
    photos = [make_photo(seed=s) for s in (1, 2)]
    pixels = handler.preprocess(photos)
    assert pixels.shape == (2, 3, 224, 224)
    results = handler.infer(pixels, DecodeConfig(num_beams=2, num_return_sequences=2, return_attention=True))
    bodies = handler.postprocess(results, attention=True)
    expected = tiny_captioner.caption(photos, num_beams=2, num_return_sequences=2)
    assert [b["caption"] for b in bodies] == [e.text for e in expected]
    assert all(len(b["sequences"]) == 2 for b in bodies)
    assert bodies[0]["sequences"][0]["words"] == expected[0].sequences[0].words
    assert "attention" in bodies[0]["sequences"][0]
    assert "attention" not in handler.postprocess(results, attention=False)[0]["sequences"][0]
    with pytest.raises(UnsupportedImageError):
        handler.preprocess([b"no"])


def test_attention_png_needs_attention(tiny_captioner):
    handler = CaptionHandler(tiny_captioner, max_pixels=10**7)
    pixels = handler.preprocess([make_photo()])
    with_attention = handler.infer(pixels, DecodeConfig(num_beams=1, max_new_tokens=3, return_attention=True))
    sheet = Image.open(io.BytesIO(attention_png(pixels[0], with_attention[0])))
    assert sheet.format == "PNG" and sheet.width >= 224 * 2
    without = handler.infer(pixels, DecodeConfig(num_beams=1, max_new_tokens=3))
    with pytest.raises(ValueError):
        attention_png(pixels[0], without[0])


def test_serve_command_is_registered():
    from captioner.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "9999", "--workers", "2", "--max-batch-size", "8"])
    assert (args.port, args.workers, args.max_batch_size, args.dev) == (9999, 2, 8, False)
