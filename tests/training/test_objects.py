"""COCO object mentions in captions (CHAIR's synonyms) and COCO instance annotations."""

from __future__ import annotations

import json

import pytest

from training.objects import CATEGORIES, load_instances, mentioned_objects, mentioned_scenes, reference_objects


@pytest.mark.parametrize("caption, objects", [
    ("Two men riding bikes.", {"person", "bicycle"}),
    ("A little girl hugs her puppy", {"person", "dog"}),
    ("a kitten and a kitty on a sofa", {"cat", "couch"}),
    ("A hot dog on a plate", {"hot dog"}),
    ("a dog next to two hot dogs", {"dog", "hot dog"}),
    ("a child holding a teddy bear", {"person", "teddy bear"}),
    ("a polar bear in the water", {"bear"}),
    ("a red fire hydrant on the sidewalk", {"fire hydrant"}),
    ("a hydrant", {"fire hydrant"}),
    ("a woman talking on her cell phone at a traffic light", {"person", "cell phone", "traffic light"}),
    ("a tennis player swings a tennis racket", {"person", "tennis racket"}),
    ("a batter swings a baseball bat near a stop sign", {"person", "baseball bat", "stop sign"}),
    ("a baby sleeping", {"person"}),
    ("a baby elephant follows its mother", {"elephant", "person"}),  # the mother is a person word
    ("a passenger train on the tracks", {"train"}),
    ("train tracks by the bus stop", set()),
    ("a man in an orange shirt", {"person"}),
    ("oranges and an orange on a table", {"orange", "dining table"}),
    ("a boy in a baseball cap kicking a football", {"person", "sports ball"}),
    ("the dog's ball", {"dog", "sports ball"}),
    ("knives forks and wine glasses", {"knife", "fork", "wine glass"}),
    ("a man wearing a bow tie on the bow of a boat", {"person", "tie", "boat"}),
    ("children and people and women", {"person"}),
    ("a toilet seat", {"toilet"}),
    ("a grassy field under a blue sky", set()),
])
def test_mentioned_objects_maps_synonyms_phrases_and_plurals(caption, objects):
    assert mentioned_objects(caption) == objects


def test_every_category_is_named_by_its_own_name():
    assert len(CATEGORIES) == 80
    for category in CATEGORIES:
        assert mentioned_objects(f"there is a {category} here") == {category}, category


def test_load_instances_gives_each_listed_image_its_categories(tmp_path):
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps({
        "images": [{"id": 1}, {"id": 2}, {"id": 3}],
        "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 17, "name": "cat"}],
        "annotations": [{"image_id": 1, "category_id": 1}, {"image_id": 1, "category_id": 18},
                        {"image_id": 1, "category_id": 18}, {"image_id": 2, "category_id": 17}],
    }))
    assert load_instances(path) == {"1": {"person", "dog"}, "2": {"cat"}, "3": set()}


def test_load_instances_rejects_a_captions_file(tmp_path):
    path = tmp_path / "captions_val2017.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "a dog"}]}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        load_instances(path)


@pytest.mark.parametrize("caption, scenes", [
    ("two dogs play on the lawn", {"grass"}),
    ("a grassy field by a lake", {"grass", "water"}),
    ("cars on the streets of a city", {"street"}),
    ("a plate of food in a kitchen", {"food", "kitchen"}),
    ("a man swims in the pool", {"water"}),
    ("a cat on a laptop", set()),
])
def test_mentioned_scenes_maps_words_and_plurals(caption, scenes):
    assert mentioned_scenes(caption) == scenes


def test_reference_objects_takes_scenes_too():
    references = ["a dog on the grass", "a dog in a field", "a dog on a lawn by the road", "a dog", "a dog outside"]
    assert reference_objects(references) == ({"dog"}, {"dog"})
    assert reference_objects(references, mentioned=mentioned_scenes) == ({"grass"}, {"grass", "street"})
