"""ONNX Runtime inference of an exported model, and the files of an export (`onnx_export.py`
writes them; both need the optional extra `captioner[onnx]`).

`captioner export CHECKPOINT OUT.onnx --format onnx` writes three graphs, each checked by
`onnx.checker`, and `--checkpoint OUT.onnx` runs them with ONNX Runtime:

    OUT.onnx                pixels (B, 3, S, S) uint8 -> regions (B, P, E), pooled (B, E)
                            [, imagenet_logits (B, C) where the model has a tagger]
    OUT.decoder_init.onnx   regions, pooled -> the decoder state of one sequence per image
    OUT.decoder_step.onnx   tokens (N,), state -> logits (N, V), next state [, alpha (N, P)]
    OUT.encoder_int8.onnx   (where int8 calibration exists for the encoder) the int8 encoder, for
                            CPUs with int8 dot products (VNNI, AMX)
    OUT.encoder_int8_7bit.onnx  the same with 7-bit weights, for CPUs without them

N = B*K sequences (K beams or samples per image); the state is the decoder's own `DecoderState`:
h (L, N, D), c (L, N, D) for an LSTM, and per image image_gates (B, G), memory (B, P, F),
memory_att (B, P, A) with attention. OUT.onnx's metadata (`metadata_props`) carries what a
deployment needs besides the graphs: `vocabulary` (JSON list of words, ids in order),
`preprocessing` (resize, size, mean/std: the graph normalises the uint8 pixels itself),
`decoding` (the library's decoding defaults), `tagger` (the ImageNet tag words and their
calibration; the head's weights are the graph's `tagger.weight` / `tagger.bias`) and `captioner`
(configs, file names, provenance). Decoding in Python goes through `captioner.decoding` unchanged:
`OrtDecoder` offers the decoder's step API (`init_state`, `step`), so greedy, sampling and beam
search (and what is added to them later) run on ONNX Runtime as they do on PyTorch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from ..decoder import DecoderConfig, DecoderState
from ..encoder import EncoderConfig
from .precision import ONNX_EXTRA

FORMAT = "captioner-onnx"
FORMAT_VERSION = 1
COMPANIONS = {"decoder_init": ".decoder_init.onnx", "decoder_step": ".decoder_step.onnx",
              "encoder_int8": ".encoder_int8.onnx", "encoder_int8_7bit": ".encoder_int8_7bit.onnx"}


class MissingExtraError(RuntimeError):
    """onnx / onnxruntime are not installed."""


def require(*modules: str) -> None:
    """Import check with the fix in the message; nothing here imports them at import time."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise MissingExtraError(f"{name} is not installed: {ONNX_EXTRA}") from error


def available() -> str | None:
    """None when ONNX Runtime can run here, else why not."""
    try:
        require("onnxruntime", "onnx")
    except MissingExtraError as error:
        return str(error)
    return None


def companion(path: str | os.PathLike, kind: str) -> Path:
    path = Path(path)
    stem = path.name[:-len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + COMPANIONS[kind])


def is_onnx(path: str | os.PathLike) -> bool:
    """An ONNX file: by name, or by content (a protobuf whose first field is ir_version)."""
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except OSError:
        return False
    return head[:1] == b"\x08"  # field 1 (ir_version), varint; a torch zip starts with "PK"


# -- state <-> graph tensors ----------------------------------------------------------------------

def state_names(config: DecoderConfig) -> list[str]:
    """The decoder state's tensors, in graph order."""
    names = ["h"] + (["c"] if config.cell == "lstm" else []) + ["image_gates"]
    return names + (["memory", "memory_att"] if config.attention else [])


def step_output_names(config: DecoderConfig) -> list[str]:
    return ["logits", "next_h"] + (["next_c"] if config.cell == "lstm" else []) + (["alpha"] if config.attention else [])


def state_tensors(state: DecoderState, names: list[str]) -> list[torch.Tensor]:
    return [getattr(state, name) for name in names]


def state_from_tensors(names: list[str], tensors: Iterable[torch.Tensor]) -> DecoderState:
    values = dict(zip(names, tensors))
    return DecoderState(values["h"], values.get("c"), values["image_gates"], values.get("memory"),
                        values.get("memory_att"))


# -- running --------------------------------------------------------------------------------------

def session(model: str | os.PathLike | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session for a model file or its bytes, with `threads` intra-op threads
    (default: PyTorch's count in the calling thread)."""
    require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # No spinning between runs: decoding interleaves ONNX Runtime steps with PyTorch operations
    # on the same cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


class LazySession:
    """A session made on first use, in the thread that runs the model, so that it takes that
    thread's torch thread count (the service loads models on one thread and computes on N in its
    batching thread)."""

    def __init__(self, model: str | os.PathLike | bytes):
        self.model, self._session = model, None

    def __getattr__(self, name: str):
        if name.startswith("_") or name == "model":
            raise AttributeError(name)
        if self._session is None:
            self._session = session(self.model)
        return getattr(self._session, name)


def _numpy(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().numpy()


class OrtEncoder:
    """The encoder on ONNX Runtime: pixels (B, 3, S, S) uint8 -> regions (B, P, E), pooled (B, E)."""

    def __init__(self, session_, config: EncoderConfig, grid_size: tuple[int, int], feature_dim: int,
                 parameters: int = 0):
        self.session, self.config = session_, config
        self.grid_size, self.feature_dim, self.parameter_count = tuple(grid_size), feature_dim, parameters

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        regions, pooled = self.session.run(["regions", "pooled"], {"pixels": _numpy(pixels)})
        return torch.from_numpy(regions), torch.from_numpy(pooled)


class OrtDecoder:
    """The decoder's step API on ONNX Runtime, for `captioner.decoding.generate`. The step
    graph returns h and c, not the gates."""

    can_record_gates = False
    step_runtime = "onnxruntime"

    def __init__(self, config: DecoderConfig, init_session, step_session, parameters: int = 0):
        self.config, self.init_session, self.step_session = config, init_session, step_session
        self.names = state_names(config)
        self.parameter_count = parameters
        self.step_outputs = step_output_names(config)

    def init_state(self, regions: torch.Tensor, pooled: torch.Tensor, *, record_gates: bool = False) -> DecoderState:
        """regions (B, P, E), pooled (B, E) -> state with one sequence per image."""
        if record_gates:
            raise ValueError("an ONNX export's step graph does not return the LSTM's gates")
        outputs = self.init_session.run(self.names, {"regions": _numpy(regions.float()),
                                                     "pooled": _numpy(pooled.float())})
        return state_from_tensors(self.names, (torch.from_numpy(t) for t in outputs))

    def step(self, tokens: torch.Tensor, state: DecoderState):
        """tokens (N,) -> logits (N, V), next state, attention weights (N, P) or None."""
        feeds = {"tokens": _numpy(tokens)}
        feeds.update((name, _numpy(t)) for name, t in zip(self.names, state_tensors(state, self.names)))
        outputs = dict(zip(self.step_outputs, (torch.from_numpy(t) for t in self.step_session.run(None, feeds))))
        alpha = outputs.get("alpha")
        return outputs["logits"], state.with_sequences(outputs["next_h"], outputs.get("next_c")), alpha


def read_metadata(path: str | os.PathLike) -> tuple[dict[str, Any], Any]:
    """(metadata, the loaded onnx model) of an export's OUT.onnx; ValueError if it is not one."""
    require("onnx")
    import onnx

    try:
        graph = onnx.load(str(path))
    except Exception as error:  # DecodeError and friends
        raise ValueError(f"{path}: not a readable ONNX file ({type(error).__name__}: {error})") from error
    props = {p.key: p.value for p in graph.metadata_props}
    if "captioner" not in props:
        raise ValueError(f"{path}: an ONNX file without captioner metadata (export one with "
                         "`captioner export CHECKPOINT OUT.onnx --format onnx`)")
    meta = {key: json.loads(value) for key, value in props.items()}
    info = meta["captioner"]
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION or "part" in info:
        raise ValueError(f"{path}: not a captioner ONNX model (format {info.get('format')!r} "
                         f"{info.get('format_version')!r}, part {info.get('part', 'encoder')!r}); "
                         "load the export's main file, OUT.onnx")
    return meta, graph


def tagger_weights(graph) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tagger head's weight (C, E) and bias (C,) from the encoder graph's initializers."""
    from onnx import numpy_helper

    found = {t.name: t for t in graph.graph.initializer if t.name in ("tagger.weight", "tagger.bias")}
    if len(found) != 2:
        return None
    return tuple(torch.from_numpy(numpy_helper.to_array(found[n]).copy()) for n in ("tagger.weight", "tagger.bias"))
