"""Training end to end on a tiny data set: real feature cache, real decoding, real checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioner.api import Captioner
from captioner.cli import main as cli_main
from captioner.decoder import Decoder
from tests.conftest import tiny_decoder_config
from tests.training.conftest import tiny_train_overrides
from training.config import load_config
from training.train import Context, Progress, caption_loss, epoch_length, epoch_order, main, train_one_epoch

ROOT = Path(__file__).resolve().parents[2]


def _train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "training.train", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def test_training_run_writes_a_loadable_model_and_its_records(flickr_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_train_overrides(flickr_dir, out, **{"optim.epochs": 4}))
    result = main(cfg)
    # one validation set, named after its folder: the selection score is its CIDEr-D
    assert result["best_epoch"] >= 1 and result["val_CIDEr-D"] == result[f"val_{flickr_dir.name}_CIDEr-D"]
    assert f"val_{flickr_dir.name}_BLEU-4" in result
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_ce"] < records[0]["train_ce"]  # it learns
    assert (out / "curves.png").stat().st_size > 0 and (out / "config.yaml").is_file()
    assert any((out / "tensorboard").iterdir())
    model = Captioner.from_checkpoint(out / "best.pt", precision="fp32")
    payload = torch.load(out / "best.pt", weights_only=True)
    assert payload["provenance"]["config"]["optim"]["epochs"] == 4  # the resolved config travels along
    # training and the library write one payload: a re-save of the loaded model has the same parts
    model.save(tmp_path / "resaved.pt")
    resaved = torch.load(tmp_path / "resaved.pt", weights_only=True)
    assert resaved.keys() == payload.keys() and "training" in torch.load(out / "last.pt", weights_only=True)
    assert payload["encoder"]["weights_path"] is None and resaved["encoder"]["weights_path"] is None
    for part in ("decoder", "vocabulary", "preprocessing", "provenance"):
        assert resaved[part] == payload[part]
    assert all(torch.equal(resaved["state_dict"][k], v) for k, v in payload["state_dict"].items())
    assert "zebra" not in model.vocabulary.words  # built from the training split only
    assert model.vocabulary.words[4:7] == ["a", "the", "on"]
    assert model.preprocessing.resize == "squash"
    result = model.caption(flickr_dir / "images" / "1000_img.jpg", num_beams=2)
    assert result.text  # decodes a real image end to end

    results = tmp_path / "dev_results.json"
    code = cli_main(["evaluate", str(out / "best.pt"), "--data", str(flickr_dir), "--split", "dev", "--no-meteor",
                     "--results", str(results), "--cache-dir", str(tmp_path / "cache"), "--num-beams", "2"])
    assert code == 0
    captions = json.loads(results.read_text())  # COCO results format
    assert sorted(c["image_id"] for c in captions) == ["1008_img.jpg", "1009_img.jpg", "1010_img.jpg", "1011_img.jpg"]
    assert all(isinstance(c["caption"], str) for c in captions)


@pytest.mark.integration  # training subprocesses, three runs that may each take minutes
@pytest.mark.timeout(600)
def test_killed_run_resumes_to_the_same_weights(flickr_dir, tmp_path):
    # Two cached views: the random view of each image must be drawn alike after resuming too.
    text = tmp_path / "text.csv"  # and text batches, drawn from the same generator
    text.write_text("image,caption\nx.jpg,A giraffe eats leaves\ny.jpg,A cat on the sofa\n")
    overrides = tiny_train_overrides(flickr_dir, tmp_path / "x", **{"optim.batch_images": 2, "data.cache_views": 2,
                                                                  "data.text": f"[{text}]", "optim.text_batch": 3})
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    # The uninterrupted run goes on beside the others (the same arithmetic, only sooner).
    reference = subprocess.Popen(_train_command(*overrides, f"--run.out_dir={straight}"), env=_env(), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        process = subprocess.Popen(_train_command(*overrides, f"--run.out_dir={killed}"), env=_env(), cwd=ROOT,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            progress = _wait_for_mid_epoch_checkpoint(killed / "last.pt", min_step=5, timeout=240)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert progress["batches_done"] > 0  # killed in the middle of an epoch
        subprocess.run(_train_command(*overrides, f"--run.out_dir={killed}", "--resume"), check=True, env=_env(),
                       capture_output=True, timeout=300, cwd=ROOT)
        _, errors = reference.communicate(timeout=300)
        assert reference.returncode == 0, errors.decode()[-3000:]
    finally:
        reference.kill()
        reference.wait()

    a = torch.load(straight / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["training"]["progress"]["step"] == b["training"]["progress"]["step"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert a["training"]["progress"]["history"][-1]["val_CIDEr-D"] == b["training"]["progress"]["history"][-1]["val_CIDEr-D"]


def _wait_for_mid_epoch_checkpoint(path: Path, min_step: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            try:
                progress = torch.load(path, weights_only=True)["training"]["progress"]
            except Exception:  # replaced while we read it
                progress = None
            if progress and progress["step"] >= min_step and progress["batches_done"] > 0:
                return progress
        time.sleep(0.01)
    pytest.fail("the training run never wrote a mid-epoch checkpoint")


@pytest.mark.integration  # a training subprocess and torchrun
@pytest.mark.timeout(600)
def test_two_process_data_parallel_training_tracks_one_process(flickr_dir, tmp_path):
    overrides = tiny_train_overrides(flickr_dir, tmp_path / "x", **{"optim.epochs": 3, "model.decoder.dropout": 0.0})
    single, double = tmp_path / "single", tmp_path / "double"
    # Both at once: their start-up (imports) is most of their time on a small machine.
    reference = subprocess.Popen(_train_command(*overrides, f"--run.out_dir={single}"), env=_env(), cwd=ROOT,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "training.train", *overrides, f"--run.out_dir={double}", "--run.device=cpu"],
                             env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
        _, errors = reference.communicate(timeout=300)
    finally:
        reference.kill()
        reference.wait()
    assert reference.returncode == 0, errors.decode()[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]
    one = [json.loads(line)["train_ce"] for line in (single / "metrics.jsonl").read_text().splitlines()]
    two = [json.loads(line)["train_ce"] for line in (double / "metrics.jsonl").read_text().splitlines()]
    assert len(one) == len(two) == 3
    assert two[-1] < two[0]
    for a, b in zip(one, two):
        assert abs(a - b) / a < 0.1, (one, two)
    assert (double / "best.pt").is_file()


def test_padding_captions_to_one_length_leaves_the_loss_unchanged(vocab):
    """What lets torch.compile train on one caption length: padded positions add nothing."""
    torch.manual_seed(0)
    decoder = Decoder(tiny_decoder_config(len(vocab))).eval()
    regions = torch.randn(2, 5, 24)
    # <bos>=1 ... <eos>=2, <pad>=0; two captions per image
    tokens = torch.tensor([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0], [1, 9, 10, 2, 0], [1, 11, 2, 0, 0]])
    padded = torch.nn.functional.pad(tokens, (0, 4), value=vocab.pad_id)
    losses = []
    for t in (tokens, padded):
        logits, alphas = decoder(regions, regions.mean(dim=1), t[:, :-1])
        losses.append(caption_loss(logits, alphas, t[:, 1:], vocab.pad_id, label_smoothing=0.1, attention_reg=0.5))
    torch.testing.assert_close(losses[0], losses[1])


def test_captions_without_photos_teach_words_and_train_the_language_model(flickr_dir, tmp_path):
    text = tmp_path / "text.csv"
    text.write_text("image,caption\nx.jpg,A giraffe eats leaves.\ny.jpg,Two giraffes near a tree\n"
                    "z.jpg,A giraffe on the grass\n")
    out = tmp_path / "run"
    cfg = load_config(None, tiny_train_overrides(flickr_dir, out, **{
        "data.text": f"[{text}]", "optim.text_batch": 4, "optim.epochs": 2, "model.min_word_count": 2}))
    main(cfg)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("train_text_ce" in r for r in records)
    model = Captioner.from_checkpoint(out / "best.pt", precision="fp32")
    assert "giraffe" in model.vocabulary.words  # seen 3 times, in the text only
    assert "zebra" not in model.vocabulary.words  # dev-only words stay out
    assert model.caption(flickr_dir / "images" / "1000_img.jpg", num_beams=2, force_words=["giraffe"]).text


def test_several_data_sets_train_together_and_each_validation_set_is_reported(flickr_dir, coco_file, tmp_path):
    out = tmp_path / "run"
    coco = {"format": "coco", "path": str(coco_file), "name": "coco", "split": "train"}
    overrides = tiny_train_overrides(flickr_dir, out, **{"optim.epochs": 2, "optim.batch_images": 2})
    overrides = [o for o in overrides if not o.startswith(("--data.train.", "--data.val."))] + [
        "--data.train=" + json.dumps([{"format": "flickr", "path": str(flickr_dir), "name": "f8k"}, {**coco, "weight": 2}]),
        "--data.val=" + json.dumps([{"format": "flickr", "path": str(flickr_dir), "name": "f8k", "weight": 3},
                                    {**coco, "weight": 1}]),
    ]
    result = main(load_config(None, overrides))
    # each validation set decoded and scored; selection on the weighted mean of their CIDEr-D
    expected = (3 * result["val_f8k_CIDEr-D"] + result["val_coco_CIDEr-D"]) / 4
    assert result["val_CIDEr-D"] == pytest.approx(expected)
    assert Captioner.from_checkpoint(out / "best.pt", precision="fp32").caption(coco_file.parents[1] / "train2017" / "000000000001.jpg").text
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["provenance"]["train_images"] == 8 + 3
    assert payload["provenance"]["config"]["data"]["train"][1]["weight"] == 2
    # an epoch: 8 Flickr photos + the 3 COCO photos twice = 14, in 7 steps of 2; two epochs
    assert payload["provenance"]["step"] == 2 * 7


def test_an_epoch_sees_each_set_as_often_as_its_weight_says():
    sets = [(10, 1.0), (4, 2.5)]  # images 0-9, then 10-13
    order = epoch_order(sets, torch.Generator().manual_seed(0)).tolist()
    assert len(order) == epoch_length(sets) == 10 + 10
    counts = torch.bincount(torch.tensor(order), minlength=14).tolist()
    assert counts[:10] == [1] * 10
    assert sorted(counts[10:]) == [2, 2, 3, 3]  # twice each, and a random half a third time
    assert order != sorted(order)
    # one set of weight 1 is a plain permutation, as before data sets could be weighed
    assert sorted(epoch_order([(7, 1.0)], torch.Generator().manual_seed(1)).tolist()) == list(range(7))
    assert epoch_order([(5, 0.0), (3, 1.0)], torch.Generator().manual_seed(2)).min() >= 5


def test_finetuning_on_the_cached_frozen_trunk_trains_only_the_top_and_the_decoder(flickr_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = load_config(None, tiny_train_overrides(flickr_dir, out, **{
        "optim.epochs": 1, "model.encoder.trainable_stages": 3, "optim.finetune_from_epoch": 0,
        "optim.encoder_lr": 0.01, "data.cache_views": 2}))
    ctx = Context(cfg, None)
    assert ctx.split == 3 and ctx.items.cache.regions([ctx.items.images[0]]).shape == (1, 49, 192)
    encoder_before = {k: v.clone() for k, v in ctx.encoder.state_dict().items()}
    decoder_before = {k: v.clone() for k, v in ctx.decoder.state_dict().items()}

    def no_pixels(*args):
        raise AssertionError("the frozen part ran in training")

    monkeypatch.setattr(ctx.encoder.stages[0], "forward", no_pixels)
    train_one_epoch(ctx, Progress())
    monkeypatch.undo()
    changed = {k for k, v in ctx.encoder.state_dict().items() if not torch.equal(v, encoder_before[k])}
    top = ("backbone.model.blocks.6.", "backbone.model.conv_head.", "backbone.model.bn2.")
    assert "backbone.model.conv_head.weight" in changed and "backbone.model.blocks.6.0.conv_pw.weight" in changed
    assert all(k.startswith(top) for k in changed), sorted(changed)
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)  # eval-mode BN
    assert all(not torch.equal(v, decoder_before[k]) for k, v in ctx.decoder.state_dict().items()
               if v.is_floating_point() and k.endswith("weight"))

    # validation runs the trained top on the cached trunk: the regions the whole encoder gives
    paths = [s.image for s in ctx.val_samples[:2]]
    pixels = torch.stack([ctx.preprocessing.load(p) for p in paths])
    expected = ctx.encoder.eval().extract(ctx.preprocessing.normalize(pixels))[0]
    torch.testing.assert_close(ctx.val_regions(paths), expected, atol=5e-2, rtol=1e-2)
    # the checkpoint carries the fine-tuned encoder, and inference runs the whole of it
    ctx.save(tmp_path / "model.pt", Progress(epoch=1))
    model = Captioner.from_checkpoint(tmp_path / "model.pt", precision="fp32")
    assert model.encoder.config.trainable_stages == 3
    torch.testing.assert_close(model.encoder.extract(ctx.preprocessing.normalize(pixels))[0], expected)
