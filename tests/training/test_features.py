"""The feature cache: each image encoded once, stale caches never reused, unreadable images kept out."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from captioner.encoder import Encoder, EncoderConfig
from captioner.preprocessing import Preprocessing
from tests.conftest import make_photo
from training import features


@pytest.fixture
def images(tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"photo{i}.jpg")
        paths[-1].write_bytes(make_photo(seed=i))
    paths.append(tmp_path / "broken.jpg")
    paths[-1].write_bytes(b"not a jpeg")
    return paths


def test_cache_holds_the_encoders_regions_and_marks_unreadable_images(encoder, images, tmp_path):
    preprocessing = Preprocessing(size=224, resize="squash")
    cache = features.build_or_load(encoder, preprocessing, images, tmp_path / "cache", workers=0, progress=False)
    assert cache.valid.tolist() == [True, True, True, False]
    pixels = torch.stack([preprocessing.load(p) for p in images[:3]])
    with torch.no_grad():
        expected, _ = encoder.extract(preprocessing.normalize(pixels))  # (3, P, E)
    assert cache.array.dtype.name == "float16"
    torch.testing.assert_close(cache.regions(images[:3]), expected, atol=2e-2, rtol=2e-3)


def test_cache_is_reused_and_a_changed_preprocessing_builds_a_new_one(encoder, images, tmp_path, monkeypatch):
    preprocessing = Preprocessing(size=224, resize="squash")
    first = features.build_or_load(encoder, preprocessing, images, tmp_path / "cache", workers=0, progress=False)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(features, "_build", must_not_build)
    again = features.build_or_load(encoder, preprocessing, images, tmp_path / "cache", workers=0, progress=False)
    assert again.folder == first.folder
    cropped = dataclasses.replace(preprocessing, resize="crop")
    with pytest.raises(AssertionError, match="built again"):
        features.build_or_load(encoder, cropped, images, tmp_path / "cache", workers=0, progress=False)


def test_augmented_views_are_cached_apart_reproducibly_and_drawn_per_image(encoder, images, tmp_path):
    preprocessing = Preprocessing(size=224, resize="squash")
    build = lambda root, view: features.build_or_load(  # noqa: E731
        encoder, preprocessing, images, root, workers=0, progress=False, view=view)
    plain, augmented = build(tmp_path / "cache", 0), build(tmp_path / "cache", 1)
    assert augmented.folder != plain.folder
    assert augmented.valid.tolist() == [True, True, True, False]
    assert not torch.allclose(augmented.regions(images[:3]), plain.regions(images[:3]))
    rebuilt = build(tmp_path / "elsewhere", 1)  # the same augmentation every time it is built
    torch.testing.assert_close(rebuilt.regions(images[:3]), augmented.regions(images[:3]))

    views = features.FeatureViews([plain, augmented])
    assert not views.usable(images[3]) and views.usable(images[0])
    torch.testing.assert_close(views.regions(images[:3]), plain.regions(images[:3]))  # no generator: view 0
    drawn = views.regions(images[:1] * 64, torch.Generator().manual_seed(0))  # (64, P, E)
    from_plain = [torch.equal(row, plain.regions(images[:1])[0]) for row in drawn]
    assert 0 < sum(from_plain) < 64  # both views drawn


def test_caches_of_the_frozen_trunk_hold_its_output_apart_for_each_split(encoder, images, tmp_path):
    preprocessing = Preprocessing(size=224, resize="squash")
    build = lambda split, view=0: features.build_or_load(  # noqa: E731
        encoder, preprocessing, images, tmp_path / "cache", workers=0, progress=False, view=view, split=split)
    full, three, four, three_augmented = build(0), build(3), build(4), build(3, 1)
    assert len({full.folder, three.folder, four.folder, three_augmented.folder}) == 4
    assert full.array.shape == (4, 49, 1280) and three.array.shape == (4, 49, 192)
    assert four.array.shape == (4, 196, 112) and three.valid.tolist() == [True, True, True, False]
    pixels = preprocessing.normalize(torch.stack([preprocessing.load(p) for p in images[:3]]))
    with torch.no_grad():
        expected = encoder.split(3)[0](pixels).flatten(2).transpose(1, 2)  # (3, 49, 192)
    torch.testing.assert_close(three.regions(images[:3]), expected, atol=2e-2, rtol=2e-3)
    assert not torch.allclose(three_augmented.regions(images[:3]), three.regions(images[:3]))


def test_a_trunk_cache_is_keyed_by_the_frozen_weights_only(images):
    """Training the top leaves its cache valid (a resumed fine-tuning run reuses it); a change to
    the frozen part, or to any weight for a full-feature cache, makes a new one."""
    encoder = Encoder(EncoderConfig(pretrained=False))
    preprocessing = Preprocessing(size=224, resize="squash")
    keys = lambda: (features.cache_key(encoder, preprocessing, images),  # noqa: E731
                    features.cache_key(encoder, preprocessing, images, split=3))
    full, trunk = keys()
    with torch.no_grad():
        encoder.stages[-2].weight.add_(1.0)  # conv_head: in the top
    assert keys()[0] != full and keys()[1] == trunk
    with torch.no_grad():
        encoder.stages[0].weight.add_(1.0)  # conv_stem: in the frozen part
    assert keys()[1] != trunk
