"""ONNX export of a PyTorch model, and its encoder quantised to int8 (the optional extra
`captioner[onnx]`).

`export` writes OUT.onnx and its companions, whose files and metadata `onnxrt.py` describes and
runs; `int8_encoder` builds the int8 path of a .pt checkpoint at its first load (export, then
`quantize_encoder`) and caches it.

int8 (`quantize_encoder`): ONNX Runtime's static quantisation, per-channel int8 weights and uint8
activations whose ranges `training/calibrate_int8.py` measures on training photos and stores
(`captioner/data/int8_calibration.json` for the bundled encoder, a few kB). Without int8 dot
products (VNNI, AMX) the CPU multiplies uint8 by int8 with AVX2's VPMADDUBSW, which saturates
pairs of products at int16: with full-range weights the bundled encoder's features came out 58%
off (30% with 7-bit weights). Weights quantised to 7 bits (`reduce_range`) cannot saturate, so they
are used wherever the int8 encoder runs on such a CPU; where the dot products are native they cost
precision instead (the test model's features 54% off on an AVX-512 VNNI CPU, against 19% with
8 bits). So a local build takes the bits this CPU needs, and an export, which may run anywhere,
writes both files and the loader picks the one for the CPU it runs on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..files import write_atomically
from .onnxrt import (FORMAT, FORMAT_VERSION, LazySession, OrtEncoder, companion, require, state_from_tensors,
                     state_names, state_tensors, step_output_names)

log = logging.getLogger(__name__)
OPSET = 18
CALIBRATION_FILE = Path(__file__).parent.parent / "data" / "int8_calibration.json"
CALIBRATION_FORMAT_VERSION = 1
QUANTIZED_OPS = ("Conv", "Clip", "Add")  # the trunk; normalisation, pooling and the tagger head stay fp32


# -- export ---------------------------------------------------------------------------------------

class _EncoderGraph(nn.Module):
    """uint8 pixels -> the encoder's regions and pooled vector (and the tagger's ImageNet logits)."""

    def __init__(self, encoder: nn.Module, preprocessing, tagger=None):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1) * 255.0)
        self.tagger = None
        if tagger is not None:
            self.tagger = nn.Linear(tagger.weight.shape[1], tagger.weight.shape[0])
            self.tagger.weight.data.copy_(tagger.weight.cpu())
            self.tagger.bias.data.copy_(tagger.bias.cpu())

    def forward(self, pixels: torch.Tensor):
        regions, pooled = self.encoder((pixels.float() - self.mean) / self.std)  # as Preprocessing.normalize
        if self.tagger is None:
            return regions, pooled
        return regions, pooled, self.tagger(pooled)


class _InitGraph(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.names = state_names(decoder.config)

    def forward(self, regions: torch.Tensor, pooled: torch.Tensor):
        return tuple(state_tensors(self.decoder.init_state(regions, pooled, packed=False), self.names))


class _StepGraph(nn.Module):
    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder
        self.names = state_names(decoder.config)
        word_table, top_weight, top_bias = decoder.graph_tables()
        self.register_buffer("word_table", word_table.clone())  # (V, G)
        self.register_buffer("top_weight", top_weight.clone())
        self.register_buffer("top_bias", top_bias.clone())

    def forward(self, tokens: torch.Tensor, *state: torch.Tensor):
        tables = (self.word_table, self.top_weight, self.top_bias)
        logits, new_state, alpha = self.decoder.graph_step(tokens, state_from_tensors(self.names, state), tables)
        outputs = [logits, new_state.h] + ([new_state.c] if new_state.c is not None else [])
        return tuple(outputs + ([alpha] if alpha is not None else []))


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic: dict[str, dict[int, str]], *, varargs: bool = False, optimize: bool = True) -> None:
    """torch.export-based ONNX export with the named dynamic axes; one self-contained file.
    `varargs`: forward(first, *rest), as the step graph's (tokens, *state). `optimize`: onnxscript's
    graph optimiser (folds batch norms into convolutions; its constant folding fails on the
    decoder's chunked gates, which ONNX Runtime optimises when it loads them anyway)."""
    import contextlib
    import io
    import warnings

    dims: dict[str, Any] = {}
    shapes = []
    for name in input_names:
        axes = dynamic.get(name, {})
        shapes.append({axis: dims.setdefault(label, torch.export.Dim.DYNAMIC) for axis, label in axes.items()})
    structure = (shapes[0], tuple(shapes[1:])) if varargs else tuple(shapes)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracing notes
        torch.onnx.export(module.eval(), args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_shapes=structure, dynamo=True, optimize=optimize, external_data=False,
                          opset_version=OPSET, verbose=False, report=False)


def export_encoder(model, target: Path) -> None:
    """OUT.onnx's graph: uint8 pixels -> regions, pooled (and ImageNet logits with a tagger)."""
    require("onnx", "onnxruntime", "onnxscript")
    size = model.preprocessing.size
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    outputs = ["regions", "pooled"] + (["imagenet_logits"] if model.tagger is not None else [])
    graph = _EncoderGraph(model.encoder.cpu().float(), model.preprocessing, model.tagger)
    _export(graph, (pixels,), target, ["pixels"], outputs, {"pixels": {0: "batch"}})


def export_decoder_init(decoder: nn.Module, regions: torch.Tensor, pooled: torch.Tensor, target: Path) -> None:
    """The decoder's per-image start as a graph: regions (B, P, E), pooled (B, E) -> its state
    (`state_names`), concepts computed from the pooled vector where the decoder takes them. The
    example inputs only fix the graph's dtypes and non-batch sizes."""
    with torch.enable_grad():  # the plain init (its packed inference weights do not export)
        _export(_InitGraph(decoder.cpu().float()), (regions, pooled), target, ["regions", "pooled"],
                state_names(decoder.config), {"regions": {0: "batch"}, "pooled": {0: "batch"}}, optimize=False)


def export(model, target: str | os.PathLike, *, calibration: dict | None = None,
           int8: bool = True) -> dict[str, Path]:
    """Write `model` (a PyTorch `Captioner`) as ONNX graphs: OUT.onnx and its companions (module
    docstring). The int8 encoder is written when `int8` and a calibration for this encoder exists
    (`calibration`, else the bundled one where it fits). Returns the files written, by kind."""
    require("onnx", "onnxruntime", "onnxscript")
    import onnx

    from ..decoding import DecodeConfig

    if not isinstance(model.encoder, nn.Module) or not isinstance(model.decoder, nn.Module):
        raise ValueError("export needs a PyTorch model (a .pt checkpoint), not an ONNX one")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    encoder, decoder, cfg = model.encoder.cpu().float(), model.decoder.cpu().float(), model.decoder.config
    size = model.preprocessing.size
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    names = state_names(cfg)
    files = {"encoder": target, "decoder_init": companion(target, "decoder_init"),
             "decoder_step": companion(target, "decoder_step")}
    export_encoder(model, files["encoder"])
    with torch.enable_grad():  # the decoder's plain step (its packed inference weights do not export)
        with torch.no_grad():
            regions, pooled = encoder(model.preprocessing.normalize(pixels))
        export_decoder_init(decoder, regions, pooled, files["decoder_init"])
        with torch.no_grad():
            state = decoder.init_state(regions, pooled, packed=False).repeat(3)  # N = B*K = 6 sequences
        tokens = torch.tensor([1, 5, 6, 7, 8, 9], dtype=torch.long)
        sequence_axes = {"tokens": {0: "sequences"}, "h": {1: "sequences"}, "c": {1: "sequences"},
                         "image_gates": {0: "batch"}, "memory": {0: "batch"}, "memory_att": {0: "batch"}}
        step_outputs = step_output_names(cfg)
        _export(_StepGraph(decoder), (tokens, *state_tensors(state, names)), files["decoder_step"],
                ["tokens", *names], step_outputs, sequence_axes, varargs=True, optimize=False)

    calibration = calibration if calibration is not None else bundled_calibration(model)
    if int8 and calibration is not None:
        for kind, reduce_range in (("encoder_int8", False), ("encoder_int8_7bit", True)):
            files[kind] = companion(target, kind)
            quantize_encoder(files["encoder"], files[kind], calibration, reduce_range=reduce_range)

    description = model.describe()
    metadata = {
        "captioner": json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "encoder": model.encoder.config.to_dict(), "decoder": cfg.to_dict(),
            "grid_size": list(model.encoder.grid_size), "feature_dim": model.encoder.feature_dim,
            "parameters": description["parameters"], "state": names,
            "files": {kind: path.name for kind, path in files.items() if kind != "encoder"},
            "int8_calibration": None if calibration is None else _calibration_summary(calibration),
            "source_checkpoint_sha256": model.checkpoint_sha256, "provenance": model.provenance,
        }, default=str),
        "vocabulary": json.dumps(model.vocabulary.words),
        "preprocessing": json.dumps(model.preprocessing.to_dict()),
        "decoding": json.dumps(DecodeConfig().to_dict()),
    }
    if model.tagger is not None:
        tagger = model.tagger.to_dict()
        tagger.pop("weight"), tagger.pop("bias")
        metadata["tagger"] = json.dumps(tagger)
    for kind, path in files.items():
        graph = onnx.load(str(path))
        del graph.metadata_props[:]
        entries = metadata if kind == "encoder" else {"captioner": json.dumps(
            {"format": FORMAT, "format_version": FORMAT_VERSION, "part": kind, "model": target.name})}
        for key, value in entries.items():
            graph.metadata_props.add(key=key, value=value)
        graph.producer_name, graph.doc_string = "captioner", f"captioner {kind}"
        onnx.checker.check_model(graph, full_check=True)
        onnx.save(graph, str(path))
    return files


# -- int8 -----------------------------------------------------------------------------------------

def encoder_digest(encoder: nn.Module) -> str:
    """SHA-256 over the encoder's weights (names, shapes, fp32 values): a calibration belongs to it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def bundled_calibration(model) -> dict | None:
    """The calibration shipped for the bundled encoder, when `model`'s encoder is that one."""
    if not CALIBRATION_FILE.is_file() or not isinstance(model.encoder, nn.Module):
        return None
    calibration = json.loads(CALIBRATION_FILE.read_text(encoding="utf-8"))
    return calibration if calibration.get("encoder_sha256") == encoder_digest(model.encoder) else None


def _calibration_summary(calibration: dict) -> dict:
    return {k: v for k, v in calibration.items() if k != "ranges"}


def _prepared(fp32_path: Path, folder: Path) -> Path:
    """ONNX Runtime's pre-processing for quantisation (shape inference, graph clean-up)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = folder / "prepared.onnx"
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
    return prepared


def calibrate(fp32_path: str | os.PathLike, batches: Iterable[torch.Tensor], *, method: str = "percentile",
              percentile: float = 99.99) -> dict[str, list[float]]:
    """Activation ranges of the encoder graph over uint8 pixel batches: tensor name -> [low, high]."""
    require("onnxruntime", "onnx")
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, create_calibrator

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"pixels": batch.contiguous().numpy()}

    kinds = {"minmax": (CalibrationMethod.MinMax, {}),
             "percentile": (CalibrationMethod.Percentile, {"percentile": percentile, "symmetric": False})}
    if method not in kinds:
        raise ValueError(f"method must be one of {sorted(kinds)}, not {method!r}")
    with tempfile.TemporaryDirectory(prefix="captioner-calibrate-") as folder:
        prepared = _prepared(Path(fp32_path), Path(folder))
        kind, options = kinds[method]
        calibrator = create_calibrator(str(prepared), list(QUANTIZED_OPS), str(Path(folder) / "augmented.onnx"),
                                       calibrate_method=kind, extra_options=options)
        calibrator.collect_data(Reader())
        ranges = calibrator.compute_data()
    return {name: [float(data.range_value[0]), float(data.range_value[1])] for name, data in ranges.items()}


def quantize_encoder(fp32_path: str | os.PathLike, target: str | os.PathLike, calibration: dict, *,
                     reduce_range: bool = False) -> None:
    """Write the int8 encoder: per-channel int8 weights (7-bit with `reduce_range`, for CPUs
    without int8 dot products), uint8 activations with the calibration's ranges (QOperator
    format: fused QLinearConv kernels)."""
    require("onnxruntime", "onnx")
    import numpy as np
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="captioner-quantize-") as folder:
        prepared = _prepared(Path(fp32_path), Path(folder))
        ranges = TensorsData(CalibrationMethod.MinMax, {
            name: (np.array(low, dtype=np.float32), np.array(high, dtype=np.float32))
            for name, (low, high) in calibration["ranges"].items()})
        _check_ranges(prepared, ranges)
        cache = Path(folder) / "ranges.json"
        save_tensors_data(ranges, cache)
        quantize_static(str(prepared), str(target), None, quant_format=QuantFormat.QOperator,
                        op_types_to_quantize=list(QUANTIZED_OPS), per_channel=True, reduce_range=reduce_range,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=str(cache))


def cache_dir() -> Path:
    """Where int8 encoders built from .pt checkpoints are kept: $CAPTIONER_CACHE, else
    $XDG_CACHE_HOME/captioner (~/.cache/captioner)."""
    if os.environ.get("CAPTIONER_CACHE"):
        return Path(os.environ["CAPTIONER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "captioner"


def int8_encoder(model, calibration: dict) -> "OrtEncoder":
    """The int8 path of a PyTorch model: its encoder exported, quantised with `calibration` and
    run by ONNX Runtime. Building it takes about 15 s on 2 cores, so the result is kept in
    `cache_dir()` under a key of everything it depends on (encoder weights, ranges, library
    versions) and later loads read it back; where the cache cannot be written it is rebuilt."""
    import onnxruntime

    from . import cpu

    reduce_range = not cpu.native_int8()
    key = hashlib.sha256(json.dumps({
        "encoder": encoder_digest(model.encoder), "ranges": calibration["ranges"], "ops": QUANTIZED_OPS,
        "reduce_range": reduce_range,
        "preprocessing": model.preprocessing.to_dict(), "format": FORMAT_VERSION, "opset": OPSET,
        "torch": torch.__version__, "onnxruntime": onnxruntime.__version__}, sort_keys=True).encode()).hexdigest()
    cached = cache_dir() / f"encoder_int8-{key[:32]}.onnx"
    if cached.is_file():
        data = cached.read_bytes()
    else:
        with tempfile.TemporaryDirectory(prefix="captioner-int8-") as folder:
            fp32, int8 = Path(folder) / "encoder.onnx", Path(folder) / "encoder_int8.onnx"
            export_encoder(model, fp32)
            quantize_encoder(fp32, int8, calibration, reduce_range=reduce_range)
            data = int8.read_bytes()
        try:
            write_atomically(cached, data)  # workers building at once each write a whole file
        except OSError as error:
            log.warning("int8 encoder not cached (%s): the next load builds it again", error)
    return OrtEncoder(LazySession(data), model.encoder.config, model.encoder.grid_size, model.encoder.feature_dim)


def _check_ranges(prepared: Path, ranges) -> None:
    """Every tensor the quantiser needs must have a range: a calibration from another encoder or
    another exporter version does not fit."""
    import onnx

    graph = onnx.load(str(prepared)).graph
    constants = {t.name for t in graph.initializer}
    needed = {name for node in graph.node if node.op_type in QUANTIZED_OPS
              for name in [*node.input, *node.output] if name and name not in constants}
    missing = sorted(needed - set(ranges.keys()))
    if missing:
        raise ValueError(f"the int8 calibration has no range for {len(missing)} of the encoder graph's "
                         f"{len(needed)} tensors (e.g. {missing[0]!r}): it was made for another encoder or "
                         "exporter version; run training/calibrate_int8.py again")
