import dataclasses
from pathlib import Path

import pytest

from captioner.decoder import DecoderConfig
from training.config import load_config


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim: {lr: 0.001, epochs: 4}\nmodel: {decoder: {attention: true}}\n")
    cfg = load_config(path, ["--optim.lr=3e-4", "--model.decoder.attention=false", "--eval.decode.num_beams=5"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.epochs == 4
    assert cfg.model.decoder.attention is False
    assert cfg.eval.decode.num_beams == 5
    assert cfg.model.decoder.hidden_dim == 384  # untouched defaults stay


def test_decoder_settings_are_decoder_config_less_what_the_data_decides():
    settings = dataclasses.asdict(load_config(None).model.decoder)
    assert settings.pop("concepts") is False  # whether to add them; their number comes from the tagger
    assert settings.pop("concept_tagger") is None  # which tagger: None is the ImageNet one
    library = dataclasses.asdict(DecoderConfig(vocab_size=20))
    assert settings == {k: v for k, v in library.items() if k not in ("vocab_size", "feature_dim", "concepts",
                                                                      "concept_classes", "concept_activation")}
    with pytest.raises(ValueError, match="model.decoder.vocab_size"):
        load_config(None, ["--model.decoder.vocab_size=20"])


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(None, ["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match="num_beams"):
        load_config(None, ["--eval.decode.num_beams=0"])
    with pytest.raises(ValueError, match="optim.epochs"):
        load_config(None, ["--optim.epochs=many"])


def test_data_sets_as_a_mapping_or_a_list_with_indexed_overrides(tmp_path):
    single = load_config(None, ["--data.train.path=somewhere", "--data.train.limit=5"])
    assert [(d.format, d.path, d.limit, d.label) for d in single.data.train] == [("flickr", "somewhere", 5, "somewhere")]
    config = tmp_path / "two.yaml"
    config.write_text(
        "data:\n  train:\n    - {format: flickr, path: a/flickr8k}\n    - {format: karpathy, path: b/coco/dataset_coco.json}\n")
    two = load_config(config, ["--data.train.1.weight=2.5"])
    assert [(d.label, d.weight) for d in two.data.train] == [("flickr8k", 1.0), ("coco", 2.5)]
    config.write_text("data:\n  train:\n    - {format: flickr, path: x/a}\n    - {format: flickr, path: y/a}\n")
    with pytest.raises(ValueError, match="distinct names"):
        load_config(config)
    with pytest.raises(ValueError, match="weight"):
        load_config(None, ["--data.train.weight=-1"])


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "training" / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_load(path):
    # a misspelt key in a recipe stage would otherwise surface only after an hour of earlier stages
    config = load_config(path)
    assert config.optim.epochs > 0 and config.data.train
