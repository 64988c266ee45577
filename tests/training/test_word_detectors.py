"""Word detectors learned from captions (training/concepts.py) and the sigmoid tagger they make."""

from __future__ import annotations

import json

import pytest
import torch

from captioner.api import Captioner
from captioner.tagger import Tagger, platt_input
from training.concepts import absent_words, average_precision, fit_detectors, forms_of, main as concepts_main, soft_labels
from training.calibrate_tagger import fit_platt
from training.config import load_config
from training.data import Sample
from training.export import export_checkpoint
from training.train import main as train_main
from tests.training.conftest import tiny_train_overrides


def test_average_precision_of_a_ranking():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.3], [0.1, 0.4]])
    positive = torch.tensor([[1, 0], [0, 0], [1, 0], [0, 0]], dtype=torch.bool)
    ap = average_precision(scores, positive)
    assert ap[0].item() == pytest.approx((1 / 1 + 2 / 3) / 2)  # hits at ranks 1 and 3
    assert ap[1].isnan()  # no positive: undefined, left out of the mean


def test_soft_labels_count_the_captions_that_name_a_word_in_any_form():
    forms = {"cat": forms_of("cat"), "bus": forms_of("bus")}
    assert forms == {"cat": ["cat", "cats"], "bus": ["bus", "buses"]}
    sample = Sample(image=None, captions=["Two cats on a bed.", "A cat sleeps", "a bed", "a dog"])
    assert soft_labels([sample], forms, ["cat", "bus"]).tolist() == [[0.5, 0.0]]


def test_detectors_learn_words_from_features_and_calibrate():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=generator) * 3 + 5  # features far from standardised
    y = torch.stack([(x[:, 0] > 5).float(), (x[:, 1] + x[:, 2] > 10).float() * 0.6], dim=1)  # (N, 2) soft labels
    weight, bias = fit_detectors(x[:500], y[:500], weight_decay=1e-4)
    logits = torch.addmm(bias, x[500:], weight.t())
    assert average_precision(logits, y[500:] > 0).min() > 0.95
    a, b = fit_platt(logits.sigmoid().flatten().double(), (y[500:] > 0).flatten().double())
    confident = torch.sigmoid(a * platt_input(logits.sigmoid()) + b)  # what Tagger.calibrate computes
    assert confident[y[500:] > 0].mean() > 0.8 and confident[y[500:] == 0].mean() < 0.2


def test_a_sigmoid_tagger_scores_each_word_on_its_own_and_round_trips():
    weight = torch.tensor([[4.0, 0.0], [0.0, 4.0], [4.0, 0.0]])
    tagger = Tagger(weight, torch.zeros(3), ["cat", "cup", "dog"], ["cat", "cup", "dog"],
                    {"cat": ["cat", "cats"], "cup": ["cup"], "dog": ["dog"]},
                    calibration={"a": 1.0, "b": 0.0}, activation="sigmoid", guidance={"threshold": 0.9, "max_tags": 2})
    pooled = torch.tensor([[1.0, 0.0]])
    probs = tagger.word_probs(pooled)[0]
    # independent outputs: cat and dog both near 1 (a softmax would split them), cup at 0.5
    assert probs.tolist() == pytest.approx([torch.sigmoid(torch.tensor(4.0)).item(), 0.5, probs[0].item()])
    tags, _ = tagger.guide(pooled)
    assert [t.word for t in tags[0]] == ["cat", "dog"] and tags[0][0].classes == []
    again = Tagger.from_dict(tagger.to_dict())
    assert again.activation == "sigmoid" and torch.allclose(again.word_probs(pooled), tagger.word_probs(pooled), atol=1e-3)
    with pytest.raises(ValueError, match="activation"):
        Tagger(weight, torch.zeros(3), ["a", "b", "c"], ["a", "b", "c"], {w: [w] for w in "abc"}, activation="relu")


def test_detectors_trained_on_a_runs_data_guide_its_exported_model(flickr_dir, tmp_path):
    out = tmp_path / "run"
    overrides = tiny_train_overrides(flickr_dir, out, **{"optim.epochs": 1})
    train_main(load_config(None, overrides))
    config = tmp_path / "run.yaml"
    config.write_text((out / "config.yaml").read_text())
    tagger_file, report = tmp_path / "tagger.pt", tmp_path / "report.json"
    assert concepts_main(["--model", str(out / "best.pt"), "--config", str(config), "--out", str(tagger_file),
                          "--report", str(report), "--min-photos", "2", "--weight-decay", "1e-3"]) == 0
    figures = json.loads(report.read_text())
    # words of the tiny set's captions that are objects or scenes, named for >= 2 of the 8 training photos
    tagger = Tagger.from_dict(torch.load(tagger_file, weights_only=True))
    assert {"dog", "cat", "grass", "bike", "park"} <= set(tagger.words) and "runs" not in tagger.words
    assert figures["words"] == len(tagger.words) and 0 <= figures["validation"][flickr_dir.name]["mAP"] <= 1
    shipped = tmp_path / "model.pt"
    export_checkpoint(out / "best.pt", shipped, tagger_file=tagger_file)
    model = Captioner.from_checkpoint(shipped, precision="fp32")
    assert model.tagger.activation == "sigmoid" and model.tagger.words == tagger.words
    model.tagger.guidance.update(threshold=0.0, max_tags=1)  # the most confident word is always required
    result = model.caption(flickr_dir / "images" / "1000_img.jpg", num_beams=2)
    [required] = result.required
    assert required.source == "tag" and required.word in tagger.words
    assert set(required.forms) & set(result.text.split())  # guided decoding said it


def test_a_word_is_banned_only_where_low_confidence_reliably_means_no_caption_names_it():
    confidence = torch.tensor([[0.01, 0.01, 0.5]] * 60 + [[0.9, 0.01, 0.9]] * 40)  # (N, W)
    named = torch.zeros(100, 3, dtype=torch.bool)
    named[60:, 0] = True  # "cup": named only where confident
    named[:3, 1] = True  # "man": named for 3 of the 100 photos where it is unlikely
    assert absent_words(confidence, named, ["cup", "man", "tea"], 0.02, max_miss=0.01, min_photos=50) == ["cup"]
    assert absent_words(confidence, named, ["cup", "man", "tea"], 0.02, max_miss=0.05, min_photos=50) == ["cup", "man"]
