"""The checkpoint format: one self-describing file, loadable with `weights_only=True`.

    {
      "format": "captioner", "format_version": 1,
      "encoder": EncoderConfig dict, "decoder": DecoderConfig dict,
      "vocabulary": {"words": [...]}, "preprocessing": Preprocessing dict,
      "provenance": {...}   # how it was trained: config, data, metrics, time
      "state_dict": {"encoder.…": tensor, "decoder.…": tensor},
      "training": {...}     # optional resume state (optimiser, schedule, RNG); not needed to caption
    }

Only plain containers, strings, numbers and tensors: no pickled classes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .files import atomic_path

FORMAT = "captioner"
FORMAT_VERSION = 1
REQUIRED = ("encoder", "decoder", "vocabulary", "preprocessing", "state_dict")


class CheckpointError(ValueError):
    """A file is not a usable captioner checkpoint."""


def checkpoint_payload(encoder, decoder, vocabulary, preprocessing, *, provenance: dict[str, Any],
                       tagger=None, training: dict[str, Any] | None = None) -> dict[str, Any]:
    """The payload of a model's parts: `encoder` and `decoder` modules with a `.config`, the others
    with `to_dict()`. The encoder's local `weights_path` is dropped: the weights travel in the
    state dict, and the path means nothing on another machine."""
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state.update({f"decoder.{k}": v for k, v in decoder.state_dict().items()})
    payload = {
        "encoder": {**encoder.config.to_dict(), "weights_path": None},
        "decoder": decoder.config.to_dict(),
        "vocabulary": vocabulary.to_dict(),
        "preprocessing": preprocessing.to_dict(),
        "provenance": provenance,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
    }
    if tagger is not None:
        payload["tagger"] = tagger.to_dict()
    if training is not None:
        payload["training"] = training
    return payload


def write_checkpoint(path: str | os.PathLike, encoder, decoder, vocabulary, preprocessing, *,
                     provenance: dict[str, Any], tagger=None, training: dict[str, Any] | None = None,
                     half: bool = False) -> None:
    """Build a model's checkpoint (`checkpoint_payload`) and write it (`save_checkpoint`)."""
    payload = checkpoint_payload(encoder, decoder, vocabulary, preprocessing, provenance=provenance,
                                 tagger=tagger, training=training)
    save_checkpoint(payload, path, half=half)


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike, *, half: bool = False) -> None:
    """Write atomically (`captioner.files`), so a crash never leaves a corrupt checkpoint.
    `half` stores floating-point weights as fp16."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    if half:
        payload["state_dict"] = {
            k: v.half() if v.is_floating_point() else v for k, v in payload["state_dict"].items()
        }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex): which checkpoint a model or an answer came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and validate a checkpoint; floating-point weights come back as fp32."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # TorchVersion is a str subclass that early checkpoints stored in their provenance.
        with torch.serialization.safe_globals([torch.torch_version.TorchVersion]):
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated zip, random bytes, disallowed pickled objects
        raise CheckpointError(f"{path}: not a readable captioner checkpoint ({type(error).__name__}: {error})") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner checkpoint (no 'format': '{FORMAT}' entry)")
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}; this captioner reads {FORMAT_VERSION}")
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing)}")
    payload["state_dict"] = {
        k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()
    }
    return payload
