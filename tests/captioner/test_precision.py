"""Inference paths: the `auto` decision and its reasons, explicit precisions, and bf16 against fp32
on the photos shipped in examples/ with the bundled model."""

import json
import sys

import pytest
import torch

from captioner.api import Captioner
from captioner.runtime import cpu, precision
from captioner.runtime.precision import QUALITY_TOLERANCE, choose_path
from tests import conftest

EXAMPLES = sorted(conftest.EXAMPLES.glob("*.jpg"))
CPU = torch.device("cpu")


def _choose(requested="auto", *, runtime="pytorch", backbone="efficientnet_lite0", int8=None, device=CPU):
    return choose_path(requested, device=device, runtime=runtime, backbone=backbone, int8_unavailable=lambda: int8)


@pytest.fixture
def measured(monkeypatch):
    """A measured table and CPU flags set by the test."""
    table = {"bf16": {"backbone": "efficientnet_lite0", "cider_delta": -0.004, "identical": 0.9,
                      "speedup_b16": {"pytorch": 1.4}},
             "int8": {"backbone": "efficientnet_lite0", "cider_delta": -0.003, "identical": 0.8,
                      "speedup_b16": {"pytorch": 1.9, "onnxruntime": 1.2}}}
    monkeypatch.setattr(precision, "MEASURED", table)

    def flags(*names):
        monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(names))
    flags("avx2", "avx512f", "avx512_bf16", "avx512_vnni")
    return table, flags


def test_auto_takes_the_fastest_measured_native_path(measured):
    table, flags = measured
    pt = _choose()
    assert (pt.precision, pt.runtime) == ("int8", "onnxruntime")  # the encoder on ONNX Runtime
    assert "avx512_vnni" in pt.reason and "-0.0030" in pt.reason and "1.90x fp32 eager" in pt.reason
    without_extra = _choose(int8="onnxruntime is not installed: pip install 'captioner[onnx]'")
    assert without_extra.precision == "bf16" and "not int8: onnxruntime is not installed" in without_extra.reason
    onnx = _choose(runtime="onnxruntime")
    assert onnx.precision == "int8" and "1.20x the ONNX export in fp32" in onnx.reason
    table["int8"]["speedup_b16"]["onnxruntime"] = 0.9  # int8 slower than the fp32 graphs: not taken
    slower = _choose(runtime="onnxruntime")
    assert slower.precision == "fp32" and "not faster than fp32" in slower.reason
    flags("avx2", "avx512f")  # neither bf16 nor VNNI: fp32, saying why
    plain = _choose()
    assert plain.precision == "fp32" and "none of avx512_bf16, amx_bf16" in plain.reason
    assert "none of avx512_vnni, avx_vnni, amx_int8" in plain.reason
    flags("avx2", "amx_bf16")  # AMX-BF16 counts as bf16
    assert _choose().precision == "bf16"


def test_auto_refuses_a_path_that_lost_quality_or_was_not_measured_for_this_model(measured):
    table, _ = measured
    table["bf16"]["cider_delta"] = table["int8"]["cider_delta"] = -(QUALITY_TOLERANCE + 0.002)
    chosen = _choose()
    assert chosen.precision == "fp32" and "lost 0.0120 CIDEr-D" in chosen.reason
    table["bf16"]["cider_delta"] = table["int8"]["cider_delta"] = -0.004
    other = _choose(backbone="resnet50")
    assert other.precision == "fp32" and "not resnet50" in other.reason
    onnx = _choose(runtime="onnxruntime", int8="this export has no int8 encoder")
    assert onnx.precision == "fp32" and "no int8 encoder" in onnx.reason and "bf16 runs on PyTorch" in onnx.reason
    assert _choose(device=torch.device("cuda")).precision == "fp32"


def test_explicit_precisions_run_or_say_what_is_missing(measured):
    _, flags = measured
    assert _choose("fp32").reason == "requested"
    assert _choose("int8", int8=None).runtime == "onnxruntime"
    with pytest.raises(ValueError, match="pip install"):
        _choose("int8", int8="onnxruntime is not installed: pip install 'captioner[onnx]'")
    with pytest.raises(ValueError, match="not on cuda"):
        _choose("int8", device=torch.device("cuda"))
    with pytest.raises(ValueError, match="bf16 runs on PyTorch"):
        _choose("bf16", runtime="onnxruntime")
    with pytest.raises(ValueError, match="precision must be one of"):
        _choose("fp16")
    flags("avx2")
    assert "emulates" in _choose("bf16").reason


@pytest.mark.integration  # `auto` may build an int8 encoder (an ONNX export) where the CPU runs int8
def test_describe_and_info_say_which_path_runs_and_why(tiny_checkpoint, capsys):
    from captioner import cli

    model = Captioner.from_checkpoint(tiny_checkpoint, precision="fp32")
    described = model.describe()["inference"]
    assert described["precision"] == "fp32" and described["requested"] == "fp32"
    assert described["cpu"]["native_bf16"] == cpu.native_bf16() and "torch_capability" in described["cpu"]
    capsys.readouterr()
    assert cli.main(["info", tiny_checkpoint, "--precision", "fp32"]) == 0
    assert "inference          fp32 on pytorch (asked: fp32): requested" in capsys.readouterr().out
    assert cli.main(["info", tiny_checkpoint, "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)["inference"]
    assert chosen["requested"] == "auto" and chosen["reason"].startswith(f"auto: {chosen['precision']}")


@pytest.fixture(scope="module")
def bundled_fp32():
    return Captioner.default(precision="fp32")


@pytest.mark.skipif(not cpu.native_bf16(), reason="this CPU has no AVX-512 BF16 or AMX: bf16 would be emulated")
def test_bf16_agrees_with_fp32_on_real_photos(bundled_fp32):
    bf16 = Captioner.default(precision="bf16")
    assert bf16.inference.precision == "bf16"
    pixels = torch.stack([bundled_fp32.load_pixels(p) for p in EXAMPLES])
    (_, pooled), (regions16, pooled16) = bundled_fp32.encode(pixels), bf16.encode(pixels)
    assert regions16.dtype == pooled16.dtype == torch.float32
    assert torch.allclose(pooled16, regions16.mean(dim=1))
    assert ((pooled16 - pooled).norm(dim=1) / pooled.norm(dim=1)).max() < 0.05
    assert torch.nn.functional.cosine_similarity(pooled16, pooled).min() > 0.999
    assert bf16.decoder.products == bf16.tagger.products == "bf16"  # guidance in the path's products too
    ours, theirs = bundled_fp32.caption_pixels(pixels), bf16.caption_pixels(pixels)
    for a, b in zip(ours, theirs):  # the tagger keeps working: the same required words, said
        assert [r.word for r in a.required] == [r.word for r in b.required] and a.required
        for result in (a, b):
            assert all(set(r.forms) & set(result.sequences[0].words) for r in result.required)
        # nearly the same caption (paths may reword: "a cat is playing with a toy ..." against "a black
        # cat is playing with a toy ..."): a broken bf16 path would share few words
        words_a, words_b = set(a.sequences[0].words), set(b.sequences[0].words)
        assert len(words_a & words_b) / len(words_a | words_b) >= 0.75, (a.text, b.text)


def test_without_the_onnx_extra_the_message_says_how_to_install_it(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, "onnx", None)
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\x08\x08")
    with pytest.raises(RuntimeError, match=r"pip install 'captioner\[onnx\]'"):
        Captioner.from_checkpoint(fake)
    with pytest.raises(ValueError, match=r"int8 is not available: onnxruntime is not installed: pip install"):
        Captioner.from_checkpoint(tiny_checkpoint, precision="int8")
