"""Object recall/precision, CHAIR, and bootstrap intervals on hand-made captions."""

from __future__ import annotations

import pytest

from training.metrics import bootstrap_intervals, caption_metrics, caption_scores, cider_per_image, object_metrics

# Photo a: every reference names a person and a bicycle, one also a dog. Photo b: all name a cat,
# two a couch. Photo c: only dogs.
REFERENCES = {
    "a": ["a man rides a bike", "a person on a bicycle with a dog", "a man and his bike"],
    "b": ["a cat on a sofa", "a kitten on a couch", "a cat sleeping"],
    "c": ["a dog", "a brown dog", "two dogs"],
}
PREDICTIONS = {
    "a": "a woman with a dog and a cat",  # person, dog, cat
    "b": "a cat on a couch",  # cat, couch
    "c": "a dog on the grass",  # dog
}
ANNOTATIONS = {"a": {"person", "bicycle"}, "b": {"cat", "couch", "tv"}}  # c: not annotated


def test_object_recall_and_precision_by_hand():
    # Named by >= 3 references: a {person, bicycle}, b {cat}, c {dog}; the captions get person,
    # cat, dog: 3 of 4. Named objects 3 + 2 + 1, of them in some reference 2 (not the cat) + 2 + 1.
    # With the scenes too: c's grass is named by no reference (recall: no scene is salient).
    assert object_metrics(PREDICTIONS, REFERENCES) == pytest.approx({
        "object_recall": 3 / 4, "object_precision": 5 / 6, "object_scene_recall": 3 / 4, "object_scene_precision": 5 / 7})
    on_grass = {**REFERENCES, "c": ["a dog on the grass", "a dog on a lawn", "two dogs in a field"]}
    assert object_metrics(PREDICTIONS, on_grass)["object_scene_recall"] == pytest.approx(4 / 5)
    assert object_metrics(PREDICTIONS, on_grass)["object_scene_precision"] == pytest.approx(6 / 7)
    # With 2 references enough, b's couch counts too: 4 of 5.
    assert object_metrics(PREDICTIONS, REFERENCES, min_refs=2)["object_recall"] == pytest.approx(4 / 5)


def test_chair_by_hand():
    metrics = object_metrics(PREDICTIONS, REFERENCES, annotations=ANNOTATIONS)
    # Over a and b only (c has no annotations): a's cat is neither annotated nor in a reference (the
    # dog is in a reference: CHAIR's ground truth is annotations and references together).
    assert metrics["CHAIR_i"] == pytest.approx(1 / 5)  # 1 of the 3 + 2 objects named
    assert metrics["CHAIR_s"] == pytest.approx(1 / 2)  # 1 of the 2 captions
    assert metrics["annotation_recall"] == pytest.approx(3 / 5)  # person; cat, couch (not the tv)
    assert metrics["object_recall"] == pytest.approx(3 / 4)  # unchanged by the annotations
    assert "CHAIR_i" not in object_metrics(PREDICTIONS, REFERENCES)


def test_object_metrics_need_references_for_every_caption():
    with pytest.raises(ValueError, match="no references"):
        object_metrics({**PREDICTIONS, "d": "a cat"}, REFERENCES)


def _photos(copies: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    """20 photos, some captioned well and some badly, repeated `copies` times (much the same
    per-image CIDEr-D each time: the document frequencies scale with the copies)."""
    pool = [["a dog runs on the grass", "a brown dog on the grass", "a dog running in a field"],
            ["a cat sits on the sofa", "the cat on a couch", "a cat sitting on a sofa"],
            ["a man rides a bike in the park", "a man on a bike", "a person riding a bicycle"],
            ["two people walk on a beach", "a man and a woman on the beach", "people walking on the sand"]]
    wrong = ["a dog on a bike", "a cat on the beach", "a man sits on a sofa", "a dog runs in the park"]
    predictions, references = {}, {}
    for k in range(copies):
        for i in range(20):
            image = f"{k}-{i}"
            references[image] = pool[i % 4]
            predictions[image] = pool[i % 4][i % 3] if i % 5 < 3 else wrong[i % 4]
    return predictions, references


def test_caption_scores_give_per_image_cider_that_averages_to_the_corpus_figure():
    predictions, references = _photos(1)
    metrics, per_image = caption_scores(predictions, references, meteor=False)
    assert metrics == caption_metrics(predictions, references, meteor=False)
    assert per_image == cider_per_image(predictions, references)
    assert sorted(per_image) == sorted(predictions)
    assert sum(per_image.values()) / len(per_image) == pytest.approx(metrics["CIDEr-D"])
    assert per_image["0-0"] > per_image["0-3"]  # a reference caption beats a wrong one


def test_bootstrap_intervals_hold_the_estimate_repeat_for_a_seed_and_narrow_with_more_photos():
    predictions, references = _photos(1)
    annotations = {i: {"dog"} for i in predictions}
    point = {**caption_metrics(predictions, references, meteor=False),
             **object_metrics(predictions, references, annotations=annotations)}
    intervals = bootstrap_intervals(predictions, references, annotations=annotations, resamples=500)
    assert set(intervals) == {"CIDEr-D", "object_recall", "object_precision", "object_scene_recall", "object_scene_precision",
                              "CHAIR_i", "CHAIR_s", "annotation_recall"}
    for name, (low, high) in intervals.items():
        assert low < point[name] < high, name
    again = bootstrap_intervals(predictions, references, annotations=annotations, resamples=500)
    assert again == intervals
    assert bootstrap_intervals(predictions, references, annotations=annotations, resamples=500, seed=1) != intervals

    many = bootstrap_intervals(*_photos(16), resamples=500)  # same photos, 16 times as many
    for name in ("CIDEr-D", "object_recall", "object_precision"):
        (low, high), (many_low, many_high) = intervals[name], many[name]
        assert many_high - many_low < 0.5 * (high - low), name  # about 1/4 as wide
        assert many_low < point[name] < many_high, name
