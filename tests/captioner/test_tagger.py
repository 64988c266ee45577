"""The ImageNet tagger: the encoder's own classifier head, mapped to caption words."""

from __future__ import annotations

import dataclasses
import io
import json
import math

import pytest
import torch

from captioner.encoder import Encoder, EncoderConfig, build_backbone
from captioner.tagger import WORDS_FILE, Tag, Tagger
from captioner.vocab import SPECIALS, Vocabulary
from tests.conftest import EXAMPLES


@pytest.fixture(scope="module")
def imagenet() -> Tagger:
    return Tagger.imagenet()


@pytest.fixture(scope="module")
def mapping() -> dict:
    return json.loads(WORDS_FILE.read_text(encoding="utf-8"))


def toy_tagger(calibration: dict | None = None) -> Tagger:
    """Four classes, identity head: pooled = log(p) gives class probabilities p exactly."""
    return Tagger(torch.eye(4), torch.zeros(4), ["tabby", "tiger cat", "beagle", "school bus"],
                  ["cat", "cat", "dog", "bus"],
                  {"cat": ["cat", "cats"], "dog": ["dog", "dogs"], "bus": ["bus", "buses"]},
                  calibration=calibration)


def pooled_for(*probabilities: float) -> torch.Tensor:
    return torch.tensor([probabilities]).log()  # (1, 4)


def test_head_on_pooled_trunk_features_reproduces_timm_classifier(encoder: Encoder, imagenet: Tagger):
    classifier, _ = build_backbone("efficientnet_lite0", pretrained=True, keep_classifier=True)
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = classifier.eval()(pixels)  # forward_features -> global average pool -> classifier
    _, pooled = encoder.eval().extract(pixels)
    logits = imagenet.logits(pooled)
    assert logits.shape == (2, 1000)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("products", ["bf16", "int8"])
def test_the_head_computes_in_the_products_it_is_given(encoder: Encoder, products: str):
    """The path's products (as the decoder's): int8 and bf16 scores near fp32's, the same tag for
    the cat, and scores that are not fp32's bit for bit where the CPU computes int8 (fbgemm)."""
    from captioner.products import Projection, fbgemm_available

    tagger = Tagger.imagenet()
    preprocessing = encoder.native_preprocessing
    _, pooled = encoder.eval().extract(preprocessing.normalize(preprocessing.load(EXAMPLES / "chelsea.jpg")[None]))
    with torch.inference_mode():
        fp32 = tagger.logits(pooled)
        tagger.products = products
        assert tagger.products == products
        ours = tagger.logits(pooled)
        torch.testing.assert_close(ours, Projection(tagger.weight, tagger.bias, products)(pooled))
        assert tagger.tags(pooled)[0][0].word == "cat"
    assert (ours - fp32).abs().max() < 0.05 * fp32.abs().max()
    if products == "int8" and fbgemm_available(tagger.weight):
        assert not torch.equal(ours, fp32)


@pytest.mark.parametrize("resize", ["squash", "crop"])
def test_chelsea_is_tagged_cat(encoder: Encoder, imagenet: Tagger, resize: str):
    preprocessing = dataclasses.replace(encoder.native_preprocessing, resize=resize)
    pixels = preprocessing.load(EXAMPLES / "chelsea.jpg")[None]
    _, pooled = encoder.eval().extract(preprocessing.normalize(pixels))
    tags = imagenet.tags(pooled)[0]
    assert tags and tags[0].word == "cat"
    assert tags[0].confidence > 0.5
    assert {"cat", "cats"} <= set(tags[0].forms)
    assert any("cat" in name for name in tags[0].classes)
    assert all(t.confidence >= 0.5 for t in tags)


def test_to_dict_round_trips_through_weights_only_load(imagenet: Tagger):
    data = imagenet.to_dict()
    assert data["weight"].dtype == torch.float16
    buffer = io.BytesIO()
    torch.save({"tagger": data}, buffer)
    buffer.seek(0)
    restored = Tagger.from_dict(torch.load(buffer, weights_only=True)["tagger"])
    assert restored.words == imagenet.words and restored.forms == imagenet.forms
    assert restored.class_words == imagenet.class_words and restored.calibration == imagenet.calibration
    pooled = torch.rand(3, 1280, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(restored.word_probs(pooled), imagenet.word_probs(pooled), atol=2e-3, rtol=0)
    assert restored.describe() == imagenet.describe()


def test_from_dict_rejects_another_format(imagenet: Tagger):
    with pytest.raises(ValueError, match="format"):
        Tagger.from_dict({**imagenet.to_dict(), "format_version": 99})


def test_raw_scores_sum_the_classes_of_a_word():
    tagger = toy_tagger()
    raw, probs = tagger.raw_scores(pooled_for(0.3, 0.3, 0.25, 0.15))
    torch.testing.assert_close(probs, torch.tensor([[0.3, 0.3, 0.25, 0.15]]))
    by_word = dict(zip(tagger.words, raw[0].tolist()))
    assert by_word == pytest.approx({"cat": 0.6, "dog": 0.25, "bus": 0.15})


def test_platt_scaling():
    raw = torch.tensor([0.01, 0.3, 0.9])
    identity = toy_tagger({"a": 1.0, "b": 0.0, "input": "logit"})
    torch.testing.assert_close(identity.calibrate(raw), raw)
    log_input = toy_tagger({"a": 2.0, "b": 0.5, "input": "log"})
    expected = torch.tensor([1 / (1 + math.exp(-(2 * math.log(r) + 0.5))) for r in raw.tolist()])
    torch.testing.assert_close(log_input.calibrate(raw), expected)
    with pytest.raises(ValueError, match="input"):
        toy_tagger({"a": 1.0, "b": 0.0, "input": "probit"})


def test_tags_respect_threshold_and_max_tags():
    tagger = toy_tagger()
    pooled = pooled_for(0.3, 0.3, 0.25, 0.15)  # cat 0.6, dog 0.25, bus 0.15
    words = lambda **options: [t.word for t in tagger.tags(pooled, **options)[0]]
    assert words(threshold=0.5) == ["cat"]
    assert words(threshold=0.2) == ["cat", "dog"]
    assert words(threshold=0.1, max_tags=3) == ["cat", "dog", "bus"]
    assert words(threshold=0.1) == ["cat", "dog"]  # max_tags=2 by default
    assert words(threshold=0.0, max_tags=0) == []
    assert words(threshold=0.7) == []
    cat = tagger.tags(pooled)[0][0]
    assert cat == Tag("cat", ["cat", "cats"], pytest.approx(0.6), ["tabby", "tiger cat"])
    assert cat.to_dict()["classes"] == ["tabby", "tiger cat"]
    with pytest.raises(ValueError):
        tagger.tags(pooled, threshold=1.5)


def test_tied_tags_keep_the_words_order_and_an_empty_batch_has_none():
    tagger = toy_tagger()
    pooled = pooled_for(0.1, 0.1, 0.4, 0.4)  # cat 0.2, dog 0.4, bus 0.4
    assert tagger.words == ["bus", "cat", "dog"]
    assert [t.word for t in tagger.tags(pooled, threshold=0.3)[0]] == ["bus", "dog"]
    assert [t.word for t in tagger.tags(pooled, threshold=0.3, max_tags=1)[0]] == ["bus"]
    assert tagger.tags(pooled[:0], threshold=0.0) == []


def test_tags_keep_only_words_and_forms_in_the_vocabulary():
    tagger = toy_tagger()
    pooled = pooled_for(0.3, 0.3, 0.25, 0.15)
    vocabulary = Vocabulary([*SPECIALS, "a", "dogs", "bus", "buses"])  # no "cat", only the plural "dogs"
    tags = tagger.tags(pooled, threshold=0.1, vocabulary=vocabulary)[0]
    assert [(t.word, t.forms) for t in tags] == [("dog", ["dogs"]), ("bus", ["bus", "buses"])]


def test_tags_are_per_image():
    tagger = toy_tagger()
    pooled = torch.cat([pooled_for(0.45, 0.45, 0.05, 0.05), pooled_for(0.05, 0.05, 0.1, 0.8)])
    assert [[t.word for t in image] for image in tagger.tags(pooled)] == [["cat"], ["bus"]]


def test_imagenet_knows_only_its_own_backbone():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        Tagger.imagenet("resnet50")


@pytest.mark.parametrize("backbone", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_encoders_load_from_their_wheels_and_see_the_cat(backbone: str):
    encoder = Encoder(EncoderConfig(backbone=backbone)).eval()
    size = {"efficientnet_lite1": 240, "efficientnet_lite2": 260}[backbone]
    assert encoder.native_preprocessing.size == size and encoder.feature_dim == 1280
    pixels = encoder.native_preprocessing.load(EXAMPLES / "chelsea.jpg")[None]
    _, pooled = encoder.extract(encoder.native_preprocessing.normalize(pixels))
    assert Tagger.imagenet(backbone).tags(pooled)[0][0].word == "cat"


def test_mapping_file(mapping: dict):
    classes = mapping["classes"]
    assert len(classes) == 1000
    assert [c["wnid"] for c in classes] == sorted(c["wnid"] for c in classes)  # ImageNet-1k's class order
    assert {c["word"] for c in classes[151:269]} == {"dog"}  # all 118 dog breeds, Chihuahua to Mexican hairless
    assert {c["word"] for c in classes[281:286]} == {"cat"}  # tabby, tiger cat, Persian, Siamese, Egyptian
    by_name = {c["name"]: c["word"] for c in classes}
    assert by_name["laptop, laptop computer"] == "laptop"
    assert by_name["pizza, pizza pie"] == "pizza"
    assert by_name["school bus"] == "bus"
    assert by_name["African elephant, Loxodonta africana"] == "elephant"
    assert by_name["zebra"] == "zebra"
    assert by_name["sea lion"] is None  # not "lion"
    words = mapping["words"]
    assert {c["word"] for c in classes} - {None} == set(words)
    assert {"cat", "cats"} <= set(words["cat"]["forms"]) and {"bus", "buses"} <= set(words["bus"]["forms"])
    assert all(entry["forms"][0] == word and entry["count"] > 0 for word, entry in words.items())
    calibration = mapping["calibration"]
    assert math.isfinite(calibration["a"]) and math.isfinite(calibration["b"]) and calibration["a"] > 0


def test_absent_words_and_guidance_travel_with_the_tagger():
    guidance = {"threshold": 0.6, "max_tags": 1, "absent_below": 0.05, "absent_words": ["dog"]}
    tagger = Tagger(torch.eye(4), torch.zeros(4), ["tabby", "tiger cat", "beagle", "school bus"],
                    ["cat", "cat", "dog", "bus"], {"cat": ["cat", "cats"], "dog": ["dog", "dogs"], "bus": ["bus"]},
                    guidance=guidance)
    pooled = torch.cat([pooled_for(0.5, 0.47, 0.01, 0.02), pooled_for(0.1, 0.1, 0.7, 0.1)])
    assert [[t.word for t in image] for image in tagger.absent(pooled)] == [["dog"], []]
    assert [[t.word for t in image] for image in tagger.tags(pooled)] == [["cat"], ["dog"]]  # threshold 0.6
    buffer = io.BytesIO()
    torch.save(tagger.to_dict(), buffer)
    buffer.seek(0)
    again = Tagger.from_dict(torch.load(buffer, weights_only=True))
    assert again.guidance == guidance
    with pytest.raises(ValueError, match="absent_words"):
        Tagger(torch.eye(4), torch.zeros(4), ["a", "b", "c", "d"], ["cat", "cat", "dog", "bus"],
               {"cat": ["cat"], "dog": ["dog"], "bus": ["bus"]}, guidance={"absent_words": ["zebra"]})


def test_bundled_guidance_excludes_dog_only_where_reliable(mapping: dict):
    guidance = mapping["guidance"]
    assert "dog" in guidance["absent_words"] and 0 < guidance["absent_below"] <= 0.2
    assert all(e["miss"] <= 0.05 for e in guidance["absent_evidence"].values())
