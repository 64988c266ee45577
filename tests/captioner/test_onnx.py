"""ONNX export and ONNX Runtime inference (the extra captioner[onnx]) on the tiny checkpoint with
the ImageNet tagger attached: checked graphs and metadata, the same captions as PyTorch through
the same decoding module, the int8 encoder calibrated by training/calibrate_int8.py."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime", reason="ONNX Runtime is the optional extra: pip install 'captioner[onnx]'")
pytest.importorskip("onnxscript", reason="the ONNX exporter needs onnxscript: pip install 'captioner[onnx]'")
onnx = pytest.importorskip("onnx", reason="pip install 'captioner[onnx]'")

from captioner.api import Captioner  # noqa: E402
from captioner.checkpoint import CheckpointError  # noqa: E402
from captioner.decoding import DecodeConfig  # noqa: E402
from captioner.runtime import cpu, onnx_export, onnxrt  # noqa: E402
from tests.conftest import make_photo  # noqa: E402
from training import calibrate_int8  # noqa: E402
from training.export import export_checkpoint, export_onnx  # noqa: E402

# Exporting and calibrating the module's model takes ~20-60 s, by CPU.
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(tiny_checkpoint, tmp_path_factory):
    """(tagged .pt, calibration file, the export's files): calibrated on photos made here."""
    folder = tmp_path_factory.mktemp("onnx")
    tagged = folder / "tagged.pt"
    export_checkpoint(tiny_checkpoint, tagged, half=False)  # attaches the ImageNet tagger
    photos = folder / "photos"
    photos.mkdir()
    for seed in range(6):
        (photos / f"{seed}.jpg").write_bytes(make_photo(seed=10 + seed))
    calibration = folder / "calibration.json"
    assert calibrate_int8.main([str(photos), "--checkpoint", str(tagged), "--count", "6", "--out", str(calibration)]) == 0
    files = export_onnx(tagged, folder / "model.onnx", calibration=calibration)
    return tagged, calibration, files


@pytest.fixture(scope="module")
def pair(exported):
    tagged, _, files = exported
    return Captioner.from_checkpoint(tagged, precision="fp32"), Captioner.from_checkpoint(files["encoder"], precision="fp32")


@pytest.fixture(scope="module")
def pixels(pair):
    return torch.stack([pair[0].load_pixels(make_photo(seed=s)) for s in range(3)])


def test_export_writes_checked_graphs_with_metadata(exported, pair):
    _, _, files = exported
    assert set(files) == {"encoder", "decoder_init", "decoder_step", "encoder_int8", "encoder_int8_7bit"}
    for path in files.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    main = onnx.load(str(files["encoder"]))
    meta = {p.key: json.loads(p.value) for p in main.metadata_props}
    model = pair[0]
    assert meta["vocabulary"] == model.vocabulary.words
    assert meta["preprocessing"] == model.preprocessing.to_dict()
    assert meta["decoding"] == json.loads(json.dumps(DecodeConfig().to_dict()))
    assert meta["tagger"]["class_words"] == model.tagger.class_words
    assert meta["captioner"]["files"]["decoder_step"] == files["decoder_step"].name
    (pixels_input,) = main.graph.input
    assert pixels_input.name == "pixels" and pixels_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in main.graph.output] == ["regions", "pooled", "imagenet_logits"]
    step = onnx.load(str(files["decoder_step"]))
    assert [i.name for i in step.graph.input] == ["tokens", "h", "c", "image_gates", "memory", "memory_att"]
    assert [o.name for o in step.graph.output] == ["logits", "next_h", "next_c", "alpha"]


def test_graphs_compute_what_pytorch_computes(exported, pair, pixels):
    model, exported_model = pair
    regions, pooled = model.encode(pixels)
    session = onnxrt.session(exported[2]["encoder"])
    ort_regions, ort_pooled, logits = session.run(None, {"pixels": pixels.numpy()})
    assert torch.allclose(torch.from_numpy(ort_regions), regions, atol=1e-4, rtol=1e-3)
    assert torch.allclose(torch.from_numpy(ort_pooled), pooled, atol=1e-4, rtol=1e-3)
    assert torch.allclose(torch.from_numpy(logits), model.tagger.logits(pooled), atol=1e-3, rtol=1e-3)
    assert exported_model.tagger.describe() == model.tagger.describe()
    tokens = torch.tensor([1, 1, 1])
    with torch.inference_mode():
        logits, _, alpha = model.decoder.step(tokens, model.decoder.init_state(regions, pooled))
        ort_logits, _, ort_alpha = exported_model.decoder.step(tokens, exported_model.decoder.init_state(regions, pooled))
    assert torch.allclose(ort_logits, logits, atol=1e-4) and torch.allclose(ort_alpha, alpha, atol=1e-5)


@pytest.mark.parametrize("options", [
    dict(num_beams=1),
    dict(num_beams=3, num_return_sequences=3, return_attention=True),
    dict(do_sample=True, num_beams=1, num_return_sequences=2, seed=7, top_k=5),
    dict(num_beams=2, force_words=["dog", "ball"]),
    dict(num_beams=3, num_return_sequences=2, output_hidden_states=True),
])
def test_onnx_runtime_decodes_like_pytorch(pair, pixels, options):
    """Greedy, beam search (n-best, attention, hidden states), sampling and required words: one
    decoding module. Hidden states: h and c on both runtimes, the gates on PyTorch only."""
    config = DecodeConfig(**options)
    for ours, theirs in zip(*(m.caption_pixels(pixels, config) for m in pair)):
        assert [s.text for s in theirs.sequences] == [s.text for s in ours.sequences]
        assert [s.score for s in theirs.sequences] == pytest.approx([s.score for s in ours.sequences], abs=1e-3)
        if config.return_attention:
            assert theirs.attention.shape == ours.attention.shape == (len(ours.sequences[0].token_log_probs), 7, 7)
        for mine, other in zip(ours.sequences, theirs.sequences):
            if not config.output_hidden_states:
                assert mine.hidden_states is None and other.hidden_states is None
                continue
            assert set(mine.hidden_states) == {"h", "c", "gates"} and set(other.hidden_states) == {"h", "c"}
            for name in ("h", "c"):
                assert other.hidden_states[name].shape == (len(mine.token_log_probs), pair[0].decoder.config.hidden_dim)
                assert torch.allclose(other.hidden_states[name], mine.hidden_states[name], atol=1e-4)
        assert [r.to_dict() for r in theirs.required] == [r.to_dict() for r in ours.required]


def test_int8_encoder_from_the_calibration_script(exported, pair, pixels):
    _, calibration, files = exported
    stored = json.loads(calibration.read_text())
    assert calibration.stat().st_size < 20_000 and stored["photos"] == 6 and stored["method"] == "percentile"
    assert stored["encoder_sha256"] == onnx_export.encoder_digest(pair[0].encoder)
    int8 = Captioner.from_checkpoint(files["encoder"], precision="int8")
    assert (int8.inference.precision, int8.inference.runtime) == ("int8", "onnxruntime")
    for kind in ("encoder_int8", "encoder_int8_7bit"):
        ops = {node.op_type for node in onnx.load(str(files[kind])).graph.node}
        assert "QLinearConv" in ops and "Conv" not in ops  # every convolution runs in int8
    assert all(r.text for r in int8.caption_pixels(pixels, DecodeConfig(num_beams=3)))
    auto = Captioner.from_checkpoint(files["encoder"])
    assert auto.inference.requested == "auto" and auto.inference.precision in ("fp32", "int8")
    if not cpu.native_int8():  # auto never takes int8 there (test_precision); the features are off
        pytest.skip("this CPU has no VNNI or AMX: ONNX Runtime emulates int8 dot products with AVX2, "
                    "and the features' agreement is only measured where they are native")
    (regions, pooled), (regions8, pooled8) = pair[0].encode(pixels), int8.encode(pixels)
    assert ((regions8 - regions).norm() / regions.norm()) < 0.35
    assert torch.nn.functional.cosine_similarity(pooled8, pooled).min() > 0.95


@pytest.mark.parametrize("native", [True, False])
def test_the_int8_file_is_the_one_for_this_cpu(exported, monkeypatch, native):
    """8-bit weights where int8 dot products are native (7 bits there cost precision), 7-bit
    ones where AVX2 would saturate the 8-bit products."""
    files = exported[2]
    monkeypatch.setattr(cpu, "native_int8", lambda: native)
    int8 = Captioner.from_checkpoint(files["encoder"], precision="int8")
    expected = files["encoder_int8" if native else "encoder_int8_7bit"]
    assert Path(int8.encoder.session.model) == expected


def test_a_calibration_of_another_encoder_is_refused(exported, tmp_path):
    tagged, calibration, files = exported
    other = json.loads(calibration.read_text())
    other["encoder_sha256"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="another encoder"):
        export_onnx(tagged, tmp_path / "x.onnx", calibration=tmp_path / "other.json")
    partial = {"ranges": dict(list(other["ranges"].items())[:5])}
    with pytest.raises(ValueError, match="no range for"):
        onnx_export.quantize_encoder(files["encoder"], tmp_path / "int8.onnx", partial)


def test_only_the_export_main_file_loads_and_all_its_parts_must_be_there(exported, tmp_path):
    files = exported[2]
    with pytest.raises(CheckpointError, match="main file"):
        Captioner.from_checkpoint(files["decoder_step"])
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(files["encoder"].read_bytes())
    with pytest.raises(CheckpointError, match="missing"):
        Captioner.from_checkpoint(alone)
    with pytest.raises(ValueError, match="bf16 runs on PyTorch"):
        Captioner.from_checkpoint(files["encoder"], precision="bf16")


def test_cli_captions_and_describes_an_onnx_model(exported, pair, tmp_path, capsys):
    """The console command end to end; `info` through its `main`."""
    from captioner import cli

    files = exported[2]
    image = tmp_path / "a.jpg"
    image.write_bytes(make_photo(seed=1))
    run = subprocess.run([sys.executable, "-m", "captioner.cli", "caption", str(image), "--checkpoint",
                          str(files["encoder"]), "--precision", "fp32", "--json"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["caption"] == pair[0].caption(image.read_bytes()).text
    capsys.readouterr()
    assert cli.main(["info", str(files["encoder"]), "--precision", "int8"]) == 0
    assert "inference          int8 on onnxruntime (asked: int8)" in capsys.readouterr().out


@pytest.mark.parametrize("head", ["imagenet", "detectors"])
def test_a_decoder_with_concept_inputs_exports_its_concept_head(tiny_captioner, tmp_path, head):
    """The init graph (as `export` writes it) computes the concepts from the pooled vector, as
    the PyTorch decoder does: the ImageNet head's softmax, or word detectors' sigmoids."""
    from captioner.decoder import Decoder
    from captioner.tagger import Tagger

    imagenet = tagger = Tagger.imagenet()
    if head == "detectors":  # a sigmoid tagger of the same words (training/concepts.py): a class per word
        rows = [imagenet.class_words.index(w) for w in imagenet.words]
        tagger = Tagger(imagenet.weight[rows], imagenet.bias[rows], imagenet.words, imagenet.words, imagenet.forms,
                        calibration={"a": 0.8, "b": -0.5}, activation="sigmoid")
    config = dataclasses.replace(tiny_captioner.decoder.config, concepts=len(tagger.words),
                                 concept_classes=len(tagger.class_names), concept_activation=tagger.activation)
    decoder = Decoder(config)
    decoder.load_state_dict(tiny_captioner.decoder.state_dict(), strict=False)
    decoder.set_concept_head(tagger)
    torch.manual_seed(3)
    torch.nn.init.normal_(decoder.concept_proj.weight, std=3.0)
    decoder.eval()
    pooled = 3 * imagenet.weight[[imagenet.class_names.index(n) for n in ("tabby, tabby cat", "school bus")]]
    regions = torch.randn(2, 49, pooled.shape[1])
    graph = tmp_path / "init.onnx"
    onnx_export.export_decoder_init(decoder, regions, pooled, graph)
    outputs = onnxrt.session(graph).run(None, {"regions": regions.numpy(), "pooled": pooled.numpy()})
    theirs = dict(zip(onnxrt.state_names(config), (torch.from_numpy(t) for t in outputs)))
    with torch.inference_mode():
        ours = decoder.init_state(regions, pooled)
        plain = decoder.init_state(regions, pooled, torch.zeros(2, len(tagger.words)))
    assert torch.allclose(theirs["image_gates"], ours.image_gates, atol=1e-4)
    assert not torch.allclose(plain.image_gates, ours.image_gates, atol=1e-2)  # the concepts count


def test_a_tagger_of_word_detectors_exports_and_guides_alike(tiny_checkpoint, pixels, tmp_path):
    """A sigmoid tagger (training/concepts.py) is a linear head on the pooled vector like the
    ImageNet one: the ONNX graph computes its logits, and guidance requires the same words."""
    from captioner.tagger import Tagger

    torch.manual_seed(0)
    words = ["ball", "dog"]
    # a trained head's bias is never all zero (the exporter folds a zero bias away)
    tagger = Tagger(torch.randn(2, 1280) * 0.05, torch.tensor([0.1, -0.2]), words, words, {w: [w] for w in words},
                    calibration={"a": 1.0, "b": 0.0}, activation="sigmoid", guidance={"threshold": 0.0, "max_tags": 1})
    tagger_file = tmp_path / "tagger.pt"
    torch.save(tagger.to_dict(), tagger_file)
    shipped = tmp_path / "model.pt"
    export_checkpoint(tiny_checkpoint, shipped, half=False, tagger_file=tagger_file)
    files = export_onnx(shipped, tmp_path / "model.onnx", int8=False, tagger_file=tagger_file)
    ours, theirs = (Captioner.from_checkpoint(path, precision="fp32") for path in (shipped, files["encoder"]))
    assert ours.tagger.activation == theirs.tagger.activation == "sigmoid"
    for mine, other in zip(ours.caption_pixels(pixels), theirs.caption_pixels(pixels)):
        assert len(mine.required) == 1 and mine.required[0].word in words  # threshold 0: the likelier word
        assert [r.to_dict() for r in other.required] == [r.to_dict() for r in mine.required]
        assert other.text == mine.text
