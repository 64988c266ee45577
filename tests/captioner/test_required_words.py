"""Required words through the library: force_words, their forms, and what the result says."""

import json

import pytest

from captioner.api import Captioner
from captioner.checkpoint import save_checkpoint
from captioner.cli import main
from captioner.tagger import Tagger
from captioner.vocab import SPECIALS, Vocabulary
from tests.conftest import EXAMPLES, make_photo


def test_force_words_appear_and_the_result_says_why(tiny_captioner):
    images = [make_photo(seed=s) for s in range(3)]
    plain = tiny_captioner.caption(images, num_beams=3)
    absent = next(w for w in ("bike", "park", "ball", "sofa") if all(w not in r.words for r in
                                                                     (p.sequences[0] for p in plain)))
    results = tiny_captioner.caption(images, num_beams=3, num_return_sequences=2, force_words=[absent])
    for result in results:
        assert all(absent in seq.words for seq in result.sequences)
        [required] = result.required
        assert (required.word, required.source) == (absent, "request")
        assert result.to_dict()["required"] == [{"word": absent, "forms": [absent], "source": "request",
                                                 "satisfied": True}]
    # The same words as a comma-separated string (the CLI's and the HTTP API's form), with greedy search.
    again = tiny_captioner.caption(images[0], num_beams=1, force_words=f"{absent},dog")
    assert absent in again.sequences[0].words and "dog" in again.sequences[0].words


def test_unknown_or_invalid_force_words_are_refused(tiny_captioner, photo_bytes):
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        tiny_captioner.caption(photo_bytes, force_words=["giraffe"])
    with pytest.raises(ValueError, match="single word"):
        tiny_captioner.caption(photo_bytes, force_words=["fire hydrant"])
    with pytest.raises(ValueError, match="at most"):
        tiny_captioner.caption(photo_bytes, force_words=["a", "dog", "cat", "red"])
    with pytest.raises(ValueError, match="do_sample"):
        tiny_captioner.caption(photo_bytes, num_beams=1, do_sample=True, force_words=["dog"])


def test_word_forms_come_from_the_vocabulary():
    vocab = Vocabulary([*SPECIALS, "cat", "cats", "bus", "buses", "puppy", "puppies", "dog"])
    assert vocab.forms("cat") == ["cat", "cats"]
    assert vocab.forms("cats") == ["cats", "cat"]
    assert vocab.forms("bus") == ["bus", "buses"]
    assert vocab.forms("puppies") == ["puppies", "puppy"]
    assert vocab.forms("dog") == ["dog"]
    assert vocab.forms("zebra") == []


def test_tagger_guidance_says_cat_and_not_dog(tiny_captioner, tmp_path):
    """The tiny decoder is random, but guidance is real: the tagger sees the cat in chelsea.jpg,
    the caption must say it and, the tagger being sure there is no dog, must not say dog."""
    path = tmp_path / "tagged.pt"
    payload = tiny_captioner.checkpoint_payload()
    payload["tagger"] = Tagger.imagenet().to_dict()
    save_checkpoint(payload, path)
    model = Captioner.from_checkpoint(path, precision="fp32")
    chelsea = EXAMPLES / "chelsea.jpg"
    result = model.caption(chelsea, num_beams=3, num_return_sequences=2)
    assert [(r.word, r.source) for r in result.required] == [("cat", "tag")]
    assert result.required[0].confidence > 0.5 and result.required[0].classes
    assert [r.word for r in result.excluded] == ["dog"]
    for seq in result.sequences:
        assert "cat" in seq.words and "dog" not in seq.words
    body = result.to_dict()
    assert body["required"][0]["satisfied"] and body["excluded"][0]["satisfied"]
    plain = model.caption(chelsea, num_beams=3, tags=False)
    assert plain.required == [] and plain.excluded == []
    assert model.describe()["tagger"]["words"] > 100


def test_cli_force_words(tiny_checkpoint, tmp_path, capsys):
    photo = tmp_path / "p.jpg"
    photo.write_bytes(make_photo(seed=4))
    assert main(["caption", str(photo), "--checkpoint", tiny_checkpoint, "--force-words", "bike,sofa", "--json",
                 "--precision", "fp32"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {"bike", "sofa"} <= set(record["caption"].split())
    assert [r["word"] for r in record["required"]] == ["bike", "sofa"]
    assert main(["caption", str(photo), "--checkpoint", tiny_checkpoint, "--force-words", "giraffe",
                 "--precision", "fp32"]) == 2
    assert "not in this model's vocabulary" in capsys.readouterr().err
