"""`captioner cells`: the word properties, the scoring against a planted unit and the shuffled
baseline, the reading-aligned recording, and the command's files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from captioner.cli import main as cli_main
from training.cells import Recording, attention_properties, rank_units, record, score_units, shipped_units
from training.text_properties import caption_properties, word_class

pytestmark = pytest.mark.timeout(60)


def test_caption_properties_of_a_hand_made_caption():
    words = "two brown and white dogs are running on the grass".split()
    p = caption_properties(words)
    assert p["position"] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert p["words_left"] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    assert [w for w, v in zip(words, p["noun"]) if v] == ["dogs", "grass"]
    assert [w for w, v in zip(words, p["colour"]) if v] == ["brown", "white"]
    assert [w for w, v in zip(words, p["count"]) if v] == ["two"]
    assert [w for w, v in zip(words, p["verb"]) if v] == ["are", "running"]
    assert [w for w, v in zip(words, p["preposition"]) if v] == ["on"]
    assert [w for w, v in zip(words, p["determiner"]) if v] == ["the"]
    assert [w for w, v in zip(words, p["noun_phrase"]) if v] == ["two", "brown", "and", "white", "dogs", "the", "grass"]
    assert [w for w, v in zip(words, p["plural"]) if v] == ["dogs"]
    assert p["subject_named"] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]  # from the first noun on


def test_word_classes_from_suffixes_and_exceptions():
    assert word_class("skateboarding") == "verb" and word_class("building") == "noun"
    assert word_class("painted") == "adjective" and word_class("quickly") == "adverb"
    assert word_class("people") == "noun" and caption_properties(["people"])["plural"] == [1.0]
    assert caption_properties(["a", "grass"])["plural"] == [0.0, 0.0]
    # a determiner whose phrase breaks off before a noun marks nothing
    assert caption_properties("the young are running".split())["noun_phrase"] == [0.0, 0.0, 0.0, 0.0]


def test_attention_properties_on_a_grid():
    alpha = np.zeros((2, 9))
    alpha[0, 5] = 1.0  # row 1, column 2 of a 3 x 3 grid: on the border
    alpha[1] = 1 / 9
    p = attention_properties(alpha)
    assert p["attention_row"].tolist() == [1, 0] and p["attention_column"].tolist() == [2, 0]
    assert p["attention_border"] == pytest.approx([1.0, 8 / 9])
    assert p["attention_spread"] == pytest.approx([0.0, np.log(9)])


def planted_recording(seed: int = 0) -> Recording:
    """300 random captions; unit 3 of h is the word's position plus noise, unit 5 of c fires on
    nouns, every other unit is noise."""
    rng = np.random.default_rng(seed)
    vocabulary = "a the dog cat man grass on in red two running sits".split()
    words = [list(rng.choice(vocabulary, size=rng.integers(4, 13))) for _ in range(300)]
    props = [caption_properties(w) for w in words]
    position = np.concatenate([p["position"] for p in props])
    noun = np.concatenate([p["noun"] for p in props])
    n = len(position)
    h, c = rng.normal(size=(n, 8)), rng.normal(size=(n, 8))
    h[:, 3] = position + rng.normal(scale=0.5, size=n)
    c[:, 5] = noun + rng.normal(scale=0.3, size=n)
    attention = rng.dirichlet(np.ones(9), size=n)  # (W, 9)
    caption_of = np.repeat(np.arange(len(words)), [len(w) for w in words])
    return Recording(words, {"h": h.astype(np.float32), "c": c.astype(np.float32)}, attention, caption_of)


def test_planted_units_rank_top_with_their_property_and_the_shuffled_baseline_is_low():
    report = rank_units(score_units(planted_recording()))
    top = {(u["kind"], u["index"]): u for u in report["units"][:2]}
    assert set(top) == {("h", 3), ("c", 5)}
    assert top["h", 3]["property"] == "position" and top["h", 3]["direction"].startswith("rises")
    assert top["c", 5]["property"] == "noun" and top["c", 5]["auc"] > 0.95
    base = report["baseline"]
    assert base["shuffled_p99"] <= base["shuffled_max"] < 0.2
    assert all(u["score"] > 4 * base["shuffled_max"] for u in top.values())
    assert report["units"][2]["score"] < 0.3  # the noise units stay near the noise
    # Swapping whole captions among those of the same length keeps position, not nouns.
    assert top["h", 3]["length_matched"] == pytest.approx(top["h", 3]["score"], abs=0.02)
    assert top["c", 5]["length_matched"] < 0.3
    assert report["by_property"]["noun"]["top"][0]["name"] == "unit 5 (c): noun"
    assert report["by_group"]["context"][0]["name"] == "unit 3 (h): position in caption"
    shipped = shipped_units(report, count=4)
    assert {u["name"] for u in shipped["units"][:2]} == {"unit 5 (c): noun", "unit 3 (h): position in caption"}
    assert len(shipped["units"]) == 4


def test_record_is_reading_aligned_and_independent_of_batching(tiny_captioner):
    torch.manual_seed(0)
    regions = torch.randn(2, 49, tiny_captioner.encoder.feature_dim)
    paths = ["one.jpg", "two.jpg"]
    regions_of = lambda names: regions[[paths.index(n) for n in names]]  # noqa: E731
    captions = [("one.jpg", ["a", "dog", "runs"]), ("two.jpg", ["the", "cat", "sits", "on", "a", "sofa"])]
    together = record(tiny_captioner, captions, regions_of, gates=True)
    apart = record(tiny_captioner, captions, regions_of, gates=True, batch_size=1)
    assert together.activations["h"].shape == (9, tiny_captioner.decoder.config.hidden_dim)
    assert set(together.activations) == {"h", "c", "i", "f", "g", "o"} and together.attention.shape == (9, 49)
    for kind in together.activations:
        np.testing.assert_allclose(together.activations[kind], apart.activations[kind], atol=1e-5)

    # word 2 of caption 0 ("dog") holds the state after reading <bos> a dog
    decoder, v = tiny_captioner.decoder, tiny_captioner.vocabulary
    with torch.inference_mode():
        state = decoder.init_state(regions[:1], regions[:1].mean(dim=1))
        for word in ["<bos>", "a", "dog"]:
            _, state, _ = decoder.step(torch.tensor([v.index[word]]), state)
    np.testing.assert_allclose(together.trace("h", 0, 0)[1], state.h[-1, 0, 0].item(), atol=1e-5)
    np.testing.assert_allclose(together.activations["c"][1], state.c[-1, 0].numpy(), atol=1e-5)


def test_cells_command_writes_json_markdown_and_pictures(tiny_checkpoint, flickr_dir, tmp_path, capsys):
    out, units_file = tmp_path / "cells", tmp_path / "units.json"
    assert cli_main(["cells", tiny_checkpoint, "--data", str(flickr_dir), "--split", "train", "--out", str(out),
                     "--cache-dir", str(tmp_path / "cache"), "--top", "3", "--units-file", str(units_file)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "cells.json").read_text())
    assert report["captions"] == 8 * 2 and report["kinds"] == ["h", "c"]
    assert len(report["units"]) == 2 * report["units_per_kind"]
    assert {"position", "words_left", "attention_row"} <= {p["name"] for p in report["properties"]}
    first = report["units"][0]
    assert first["name"] in printed and (out / first["picture"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "cells.md").read_text()
    assert f"![{first['name']}]({first['picture']})" in markdown and "| rank | unit |" in markdown
    shipped = json.loads(units_file.read_text())
    assert 0 < len(shipped["units"]) <= 20 and {u["kind"] for u in shipped["units"]} <= {"h", "c"}
    assert shipped["baseline"] == {k: round(v, 4) for k, v in report["baseline"].items()}


def test_the_bundled_models_units_ship_with_the_package():
    from importlib.resources import files

    shipped = json.loads(files("captioner").joinpath("weights/default_cells.json").read_text())
    base = shipped["baseline"]["shuffled_max"]
    assert 10 <= len(shipped["units"]) <= 20
    for unit in shipped["units"]:
        assert unit["name"] == f"unit {unit['index']} ({unit['kind']}): {unit['label']}"
        assert unit["kind"] in ("h", "c") and unit["score"] > base
    assert len({(u["kind"], u["index"]) for u in shipped["units"]}) == len(shipped["units"])
