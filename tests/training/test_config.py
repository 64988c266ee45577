import pytest

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


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(None, ["--optim.learning_rate=1"])
    with pytest.raises(ValueError, match="num_beams"):
        load_config(None, ["--eval.decode.num_beams=0"])
    with pytest.raises(ValueError, match="optim.epochs"):
        load_config(None, ["--optim.epochs=many"])
