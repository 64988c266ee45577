import dataclasses

from training.config import load_config
from training.model_card import _recipe


def _stage(tmp_path, name, yaml, init=None):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml)
    provenance = {"config": dataclasses.asdict(load_config(path)), "epochs_completed": 6}
    if init:
        provenance["init_from"] = {"path": f"runs/{init[0]}/best.pt", "provenance": init[1]}
    return name, provenance


def test_the_recipe_names_each_stage_with_its_own_photo_weights_and_samples(tmp_path):
    # stages of one recipe may weigh the photo sets differently: the card must say so per stage
    sets = "data: {train: [{name: f8k, format: flickr, path: a}, {name: coco, format: karpathy, path: b, weight: %s}]}\n"
    first = _stage(tmp_path, "ce", sets % 2)
    second = _stage(tmp_path, "scst", sets % 2 + "optim: {objective: scst, scst_samples: 5}\n", first)
    third = _stage(tmp_path, "scst2", sets % 1 + "optim: {objective: scst, scst_samples: 10, scst_object_weight: 0.3, "
                   "scst_scene_penalty: 0.15}\n", second)
    lines = _recipe(third[1], "12 min.").splitlines()
    assert [line.split(",")[0] for line in lines[:3]] == ["- Stage 1", "- Stage 2", "- Stage 3"]
    assert "(photos seen per epoch: f8k 1x, coco 2x)" in lines[1] and "5 sampled" in lines[1]
    assert "from `runs/scst/best.pt` (photos seen per epoch: f8k 1x, coco 1x): 10 sampled" in lines[2]
    assert "CIDEr-D (document frequencies from the training captions), baseline" in lines[1]  # no object term
    assert "plus 0.3 x the share of the photo's salient objects" in lines[2]
    assert "minus 0.3 x the number of objects it names that no reference names" in lines[2]
    assert "minus 0.15 x the number of scenes (food, kitchen, street, water, grass) it names" in lines[2]
    assert "scenes" not in lines[1]
    assert lines[3].endswith("2-core CPU: 12 min.")


def test_a_stage_started_from_the_bundled_weights_says_it_was_the_model_bundled_then(tmp_path):
    # the file at that path now holds the card's own model: the card must not read as circular
    sets = "data: {train: [{name: f8k, format: flickr, path: a}]}\n"
    first = _stage(tmp_path, "ce", sets)
    name, provenance = _stage(tmp_path, "scst", sets + "optim: {objective: scst, scst_object_weight: 0, "
                              "scst_object_penalty: 0.5}\n", first)
    provenance["init_from"]["path"] = "captioner/weights/default.pt"
    stage = _recipe(provenance, "").splitlines()[1]
    assert "from `captioner/weights/default.pt` (the model bundled before it)" in stage
    assert "minus 0.5 x the number of objects" in stage and "salient" not in stage  # no "plus 0 x"
