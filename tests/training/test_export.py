import torch

from captioner.api import Captioner
from captioner.checkpoint import load_checkpoint, save_checkpoint
from training.export import export_checkpoint


def test_export_strips_training_state_and_halves_weights(tiny_checkpoint, tmp_path, photo_bytes):
    payload = load_checkpoint(tiny_checkpoint)
    payload["training"] = {"optimizer": {"state": {}}, "rng": torch.get_rng_state()}
    source = tmp_path / "last.pt"
    save_checkpoint({k: v for k, v in payload.items() if not k.startswith("format")}, source)
    target = tmp_path / "shipped.pt"
    export_checkpoint(source, target)
    raw = torch.load(target, weights_only=True)
    assert "training" not in raw
    assert all(t.dtype == torch.float16 for t in raw["state_dict"].values() if t.is_floating_point())
    assert target.stat().st_size < source.stat().st_size
    original = Captioner.from_checkpoint(tiny_checkpoint, precision="fp32")
    shipped = Captioner.from_checkpoint(target, precision="fp32")
    a, b = original.caption(photo_bytes, num_beams=3), shipped.caption(photo_bytes, num_beams=3)
    assert abs(a.score - b.score) < 0.05  # fp16 storage barely moves the scores


def test_export_attaches_the_imagenet_tagger_to_a_frozen_encoder(tiny_checkpoint, tmp_path):
    tagged, bare = tmp_path / "tagged.pt", tmp_path / "bare.pt"
    export_checkpoint(tiny_checkpoint, tagged)
    export_checkpoint(tiny_checkpoint, bare, tagger=False)
    assert Captioner.from_checkpoint(tagged, precision="fp32").tagger is not None
    assert Captioner.from_checkpoint(bare, precision="fp32").tagger is None
    assert torch.load(tagged, weights_only=True)["tagger"]["weight"].dtype == torch.float16
