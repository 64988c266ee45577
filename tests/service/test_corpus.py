"""Broken and unusual images through the library and the API: the right status, never a 500, and
the worker keeps serving."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.images import ImageError, open_image
from tests.conftest import make_photo
from tests.service.conftest import assert_problem, corpus, exif_rotated_photo

CASES = sorted(corpus())


@pytest.mark.parametrize("name", CASES)
def test_library(name, broken_images, tiny_captioner):
    data, status = broken_images[name]
    if status == 200:
        pixels = tiny_captioner.load_pixels(data)
        assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
        assert tiny_captioner.caption(data, num_beams=1, max_new_tokens=3).text
    else:
        with pytest.raises(ImageError) as raised:
            tiny_captioner.load_pixels(data)
        assert raised.value.status == status


@pytest.mark.parametrize("name", CASES)
def test_api(name, broken_images, client):
    data, status = broken_images[name]
    response = client.post("/v1/captions?num_beams=1&max_new_tokens=3", data=data, content_type="image/jpeg")
    if status == 200:
        assert response.status_code == 200, response.data
        assert response.get_json()["images"][0]["caption"]
    else:
        assert_problem(response, status)
    multipart = {"image": (io.BytesIO(data), f"{name}.jpg", "image/jpeg")}
    response = client.post("/v1/captions?num_beams=1&max_new_tokens=3", data=multipart,
                           content_type="multipart/form-data")
    assert response.status_code == status
    # the worker keeps serving
    assert client.post("/v1/captions?num_beams=1&max_new_tokens=3", data=make_photo(),
                       content_type="image/jpeg").status_code == 200


def test_exif_orientation_is_applied():
    data, upright = exif_rotated_photo()
    image = open_image(data)
    assert image.size == upright.size == (240, 320)
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(upright, dtype=np.int16))
    assert difference.mean() < 4  # the same picture, up to JPEG noise


def test_animated_gif_uses_the_first_frame(broken_images):
    image = open_image(broken_images["animated_gif"][0])
    assert image.getpixel((5, 5)) == (255, 0, 0)


def test_alpha_is_composited_on_white(broken_images):
    image = open_image(broken_images["palette_transparency_png"][0])
    assert image.mode == "RGB"
    source = Image.open(io.BytesIO(broken_images["palette_transparency_png"][0]))
    transparent = np.argwhere(np.asarray(source) == 0)
    if len(transparent):
        y, x = transparent[0]
        assert image.getpixel((int(x), int(y))) == (255, 255, 255)


def test_sixteen_bit_keeps_its_range(broken_images):
    image = np.asarray(open_image(broken_images["sixteen_bit_png"][0]))
    assert image.max() > 200 and image.min() < 50  # scaled, not clipped to white
