"""Decoders with concept inputs: the encoder's ImageNet head, mapped to caption words, as an input
that captions without photos give from their own words (training/text.py: TextConcepts)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from captioner.api import Captioner
from captioner.decoder import Decoder
from captioner.tagger import Tagger
from captioner.vocab import SPECIALS, Vocabulary
from tests.conftest import tiny_decoder_config
from tests.training.conftest import tiny_train_overrides
from training.config import load_config
from training.text import TextConcepts
from training.train import main


@pytest.fixture(scope="module")
def tagger() -> Tagger:
    return Tagger.imagenet()


def concept_decoder(tagger: Tagger, vocab_size: int = 20) -> Decoder:
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(vocab_size, feature_dim=1280, concepts=len(tagger.words),
                                          concept_classes=len(tagger.class_names)))
    decoder.set_concept_head(tagger)
    return decoder.eval()


def test_the_decoder_computes_the_taggers_confidences(tagger):
    decoder = concept_decoder(tagger)
    pooled = torch.randn(4, 1280) * 2
    assert torch.allclose(decoder.concept_probs(pooled), tagger.word_probs(pooled), atol=1e-5)
    reloaded = Decoder(decoder.config)
    reloaded.load_state_dict(decoder.state_dict())  # the frozen head travels in the weights
    assert torch.equal(reloaded.concept_probs(pooled), decoder.concept_probs(pooled))


def test_concepts_start_at_zero_and_then_steer_the_caption(tagger):
    """A fresh concept projection leaves the decoder as it was (a model fine-tuned with concepts
    starts from itself); once trained, given confidences override the head's."""
    decoder = concept_decoder(tagger)
    plain = Decoder(dataclasses.replace(decoder.config, concepts=0, concept_classes=0)).eval()
    plain.load_state_dict({k: v for k, v in decoder.state_dict().items() if not k.startswith("concept")})
    # pooled vectors along two classes' weights: the head is sure of a cat and of a bus
    pooled = 3 * tagger.weight[[tagger.class_names.index(n) for n in ("tabby, tabby cat", "school bus")]]
    regions, tokens = torch.randn(2, 49, 1280), torch.randint(4, 20, (2, 6))
    assert decoder.concept_probs(pooled).max(dim=1).values.min() > 0.5
    with torch.no_grad():
        assert torch.equal(decoder(regions, pooled, tokens)[0], plain(regions, pooled, tokens)[0])
        torch.nn.init.normal_(decoder.concept_proj.weight)
        own = decoder(regions, pooled, tokens)[0]
        given = decoder(regions, pooled, tokens, concepts=torch.zeros(2, len(tagger.words)))[0]
    assert not torch.allclose(own, given)
    assert torch.equal(given, plain(regions, pooled, tokens)[0])


def test_text_concepts_are_the_words_a_caption_names(tagger):
    vocab = Vocabulary([*SPECIALS, "a", "cat", "cats", "on", "bus", "pizza"])
    concepts = TextConcepts(vocab, tagger.words, tagger.forms, low=0.3, miss=0.3)
    tokens = torch.tensor([vocab.encode("cats on a bus")] * 400)
    made = concepts(tokens, torch.Generator().manual_seed(0))
    assert made.shape == (400, len(tagger.words))
    cat, bus = tagger.words.index("cat"), tagger.words.index("bus")  # "cats": any form names a concept
    others = [j for j in range(len(tagger.words)) if j not in (cat, bus)]
    assert made[:, others].abs().sum() == 0
    for column in (cat, bus):
        kept = made[:, column] > 0
        assert 0.6 < kept.float().mean() < 0.8  # named, and missed 30% of the time
        assert made[kept, column].min() >= 0.3 and made[kept, column].max() <= 1.0
    again = concepts(tokens, torch.Generator().manual_seed(0))
    assert torch.equal(made, again)  # from the caller's generator: resumed runs draw the same


def test_training_with_concepts_and_fine_tuning_a_model_to_take_them(flickr_dir, tmp_path, tagger):
    text = tmp_path / "text.csv"
    text.write_text("image,caption\nx.jpg,A pizza on a plate\ny.jpg,A cat on the sofa\nz.jpg,A pizza on the table\n")
    overrides = {"data.text": f"[{text}]", "optim.text_batch": 4, "optim.epochs": 1}
    plain = tmp_path / "plain"
    main(load_config(None, tiny_train_overrides(flickr_dir, plain, **overrides)))
    tuned = tmp_path / "tuned"
    main(load_config(None, tiny_train_overrides(flickr_dir, tuned, **overrides, **{
        "model.init_from": str(plain / "last.pt"), "model.decoder.concepts": "true"})))
    records = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert "train_text_ce" in records[0]
    model = Captioner.from_checkpoint(tuned / "last.pt", precision="fp32")
    assert model.decoder.config.concepts == len(tagger.words)
    assert model.decoder.concept_proj.weight.abs().sum() > 0  # learned
    pooled = torch.randn(3, 1280)
    assert torch.allclose(model.decoder.concept_probs(pooled), tagger.word_probs(pooled), atol=1e-5)
    assert "pizza" in model.caption(flickr_dir / "images" / "1000_img.jpg", num_beams=2, force_words=["pizza"]).text
    # a model trained with concepts from scratch, and resumed from its own checkpoint, keeps its head
    scratch = tmp_path / "scratch"
    main(load_config(None, tiny_train_overrides(flickr_dir, scratch, **overrides, **{
        "model.decoder.concepts": "true"})))
    again = tmp_path / "again"
    main(load_config(None, tiny_train_overrides(flickr_dir, again, **overrides, **{
        "model.init_from": str(scratch / "last.pt")})))
    assert Captioner.from_checkpoint(again / "last.pt", precision="fp32").decoder.config.concepts > 0


def test_training_with_learned_word_detectors_as_concepts(flickr_dir, tmp_path):
    """model.decoder.concept_tagger: a tagger file of word detectors (training/concepts.py, one
    sigmoid output per word) is the concept head, carried in the checkpoint like the ImageNet one."""
    torch.manual_seed(0)
    words = ["ball", "bike", "cat", "dog", "grass"]
    detectors = Tagger(torch.randn(5, 1280) * 0.1, torch.randn(5), words, words, {w: [w, w + "s"] for w in words},
                       calibration={"a": 0.8, "b": 0.3}, activation="sigmoid")
    tagger_file = tmp_path / "tagger.pt"
    torch.save(detectors.to_dict(), tagger_file)
    text = tmp_path / "text.csv"
    text.write_text("image,caption\nx.jpg,A dog with a ball\ny.jpg,A cat on the grass\n")
    run = tmp_path / "run"
    main(load_config(None, tiny_train_overrides(flickr_dir, run, **{
        "data.text": f"[{text}]", "optim.text_batch": 4, "optim.epochs": 1,
        "model.decoder.concepts": "true", "model.decoder.concept_tagger": str(tagger_file)})))
    model = Captioner.from_checkpoint(run / "last.pt", precision="fp32")
    config = model.decoder.config
    assert (config.concepts, config.concept_classes, config.concept_activation) == (5, 5, "sigmoid")
    photos = [flickr_dir / "images" / f"{1000 + i}_img.jpg" for i in range(4)]
    _, pooled = model.encode(torch.stack([model.load_pixels(p) for p in photos]))
    tagger = Tagger.load(tagger_file)
    expected = tagger.word_probs(pooled)
    assert expected.std() > 0.05  # the photos' confidences differ, so a wrong head would show
    assert torch.allclose(model.decoder.concept_probs(pooled), expected, atol=1e-5)
    assert model.caption(photos[0], num_beams=2).text
    with pytest.raises(ValueError, match="no tagger file"):
        Tagger.load(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a tagger file .* model checkpoint"):
        Tagger.load(run / "last.pt")
    with pytest.raises(ValueError, match="model.decoder.concept_tagger: .* not a tagger file"):
        main(load_config(None, tiny_train_overrides(flickr_dir, tmp_path / "bad", **{
            "model.decoder.concepts": "true", "model.decoder.concept_tagger": str(run / "last.pt")})))
