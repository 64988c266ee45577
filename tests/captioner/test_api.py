import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.api import Captioner
from captioner.checkpoint import CheckpointError
from tests.conftest import make_photo


def test_caption_accepts_paths_bytes_pil_and_tensors(tiny_captioner, tmp_path):
    data = make_photo(seed=1)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    results = tiny_captioner.caption([str(path), data, image, tensor], num_beams=2)
    assert len(results) == 4
    assert len({r.text for r in results}) == 1  # the same picture, whatever the container
    single = tiny_captioner.caption(path, num_beams=2)
    assert single.text == results[0].text


def test_batch_equals_one_by_one(tiny_captioner):
    images = [make_photo(seed=s) for s in range(5)]
    batched = tiny_captioner.caption(images, num_beams=3, num_return_sequences=2, batch_size=3)
    for image, result in zip(images, batched):
        alone = tiny_captioner.caption(image, num_beams=3, num_return_sequences=2)
        assert [s.text for s in alone.sequences] == [s.text for s in result.sequences]
        assert alone.score == pytest.approx(result.score, abs=1e-4)


def test_results_carry_n_best_and_attention_maps(tiny_captioner, photo_bytes):
    result = tiny_captioner.caption(photo_bytes, num_beams=3, num_return_sequences=3, return_attention=True)
    assert len(result.sequences) == 3
    best = result.sequences[0]
    assert best.attention.shape == (len(best.token_log_probs), 7, 7)
    data = result.to_dict(attention=True)
    assert data["caption"] == result.text and len(data["sequences"]) == 3
    assert data["sequences"][0]["attention_shape"] == [len(best.token_log_probs), 7, 7]
    assert torch.tensor(data["sequences"][0]["attention"]).shape == best.attention.shape  # (T, H', W')
    assert data["sequences"][0]["words"] == best.words
    assert json.loads(json.dumps(data)) == data  # plain JSON


def test_checkpoint_round_trip_with_weights_only(tiny_captioner, tiny_checkpoint, photo_bytes):
    payload = torch.load(tiny_checkpoint, weights_only=True)  # plain data and tensors only
    assert payload["format_version"] == 1 and payload["vocabulary"]["words"][:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    assert payload["preprocessing"]["resize"] == "squash"
    loaded = Captioner.from_checkpoint(tiny_checkpoint, precision="fp32")
    options = dict(num_beams=3, num_return_sequences=2)
    assert [s.text for s in loaded.caption(photo_bytes, **options).sequences] == \
        [s.text for s in tiny_captioner.caption(photo_bytes, **options).sequences]
    assert loaded.describe()["checkpoint_sha256"] and loaded.provenance == {"note": "test model"}


def test_half_precision_checkpoint_loads_as_float(tiny_captioner, tmp_path):
    path = tmp_path / "half.pt"
    tiny_captioner.save(path, half=True)
    model = Captioner.from_checkpoint(path, precision="fp32")
    assert next(model.decoder.parameters()).dtype == torch.float32


def test_bad_checkpoints_give_clear_errors_naming_the_file(tiny_checkpoint, tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(b"\x00garbage" * 100)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(open(tiny_checkpoint, "rb").read()[:5000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": torch.zeros(2)}, foreign)
    for path in (random_bytes, truncated, foreign, tmp_path / "missing.pt"):
        with pytest.raises(CheckpointError, match=path.name):
            Captioner.from_checkpoint(path)


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "captioner", "format_version": 1, "payload": object()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        Captioner.from_checkpoint(path)


def test_interrupted_save_leaves_the_old_checkpoint_intact(tiny_captioner, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    tiny_captioner.save(path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_captioner.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_caption_and_info(tiny_checkpoint, tmp_path, capsys):
    """The console command end to end; `info` and a refused option through its `main`."""
    from captioner import cli

    image = tmp_path / "a.jpg"
    image.write_bytes(make_photo(seed=2))
    broken = tmp_path / "b.jpg"
    broken.write_text("not an image")
    run = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", str(image), str(broken),
                          "--checkpoint", tiny_checkpoint, "--num-beams", "3", "--num-return-sequences", "2",
                          "--precision", "fp32", "--json"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1  # one image failed
    assert "b.jpg" in run.stderr and "not an image" in run.stderr
    record = json.loads(run.stdout.strip())
    assert record["path"] == str(image) and len(record["sequences"]) == 2
    capsys.readouterr()
    assert cli.main(["info", tiny_checkpoint, "--precision", "fp32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocabulary_size"] == 20
    assert cli.main(["caption", str(image), "--checkpoint", tiny_checkpoint, "--top-p", "3"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_saved_checkpoints_are_readable_by_other_users(tiny_captioner, tmp_path):
    """A checkpoint mounted into a container is read by its service user, not its writer."""
    previous = os.umask(0o022)
    try:
        tiny_captioner.save(tmp_path / "shared.pt")
    finally:
        os.umask(previous)
    assert (tmp_path / "shared.pt").stat().st_mode & 0o777 == 0o644
