"""`captioner export RUN/best.pt OUT.pt`: a checkpoint for shipping: the training state (optimiser,
RNG) stripped, weights in fp16 by default, and the encoder's ImageNet tagger attached where the
encoder is the frozen pretrained one whose classifier head the tagger uses (`--no-tagger` leaves
it out). `Captioner.from_checkpoint` loads it back in fp32.

`captioner export CHECKPOINT OUT.onnx --format onnx`: the same model as ONNX graphs for ONNX
Runtime, OpenVINO or Triton (`captioner/runtime/onnxrt.py` describes the files), with an int8 encoder
where an int8 calibration (training/calibrate_int8.py) fits the encoder."""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.encoder import LITE_WHEELS
from captioner.tagger import Tagger

log = logging.getLogger(__name__)
TAGGED_BACKBONES = tuple(LITE_WHEELS)  # backbones whose ImageNet head ships with their weights


def export_checkpoint(source: str | Path, target: str | Path, *, half: bool = True, tagger: bool = True,
                      tagger_file: str | Path | None = None) -> int:
    """`tagger_file`: a tagger of word detectors (training/concepts.py) to attach instead of the
    ImageNet one; it must have been trained on this model's frozen encoder."""
    payload = load_checkpoint(source)
    payload.pop("training", None)
    for key in ("format", "format_version"):
        payload.pop(key, None)
    provenance = payload.get("provenance") or {}
    payload["provenance"] = {**provenance, "torch": str(provenance.get("torch", ""))}
    encoder = payload["encoder"]
    if not tagger:
        payload.pop("tagger", None)
    elif tagger_file is not None:
        learned = Tagger.load(tagger_file)
        if learned.backbone != encoder.get("backbone") or encoder.get("trainable_stages"):
            raise ValueError(f"{tagger_file} was trained on {learned.backbone}'s pretrained features; the model's "
                             f"encoder is {encoder.get('backbone')} with {encoder.get('trainable_stages')} trainable stages")
        payload["tagger"] = learned.to_dict()
    elif encoder.get("backbone") in TAGGED_BACKBONES and not encoder.get("trainable_stages"):
        payload["tagger"] = Tagger.imagenet(encoder["backbone"]).to_dict()
    else:  # a fine-tuned trunk no longer feeds the head the features it was trained on
        log.warning("no tagger attached: the encoder is %s with %s trainable stages",
                    encoder.get("backbone"), encoder.get("trainable_stages"))
    save_checkpoint(payload, target, half=half)
    return Path(target).stat().st_size


def export_onnx(source: str | Path, target: str | Path, *, tagger: bool = True, calibration: str | Path | None = None,
                int8: bool = True, tagger_file: str | Path | None = None) -> dict[str, Path]:
    """ONNX graphs of a checkpoint (training state stripped and the tagger attached as for .pt,
    fp32 weights). `calibration`: a training/calibrate_int8.py file for the int8 encoder."""
    from captioner.api import Captioner
    from captioner.runtime.onnx_export import encoder_digest, export

    with tempfile.TemporaryDirectory(prefix="captioner-export-") as folder:
        shipped = Path(folder) / "model.pt"
        export_checkpoint(source, shipped, half=False, tagger=tagger, tagger_file=tagger_file)
        model = Captioner.from_checkpoint(shipped, precision="fp32")
    model.checkpoint_sha256 = hashlib.sha256(Path(source).read_bytes()).hexdigest()  # the source's, not the temporary's
    ranges = None
    if calibration is not None:
        ranges = json.loads(Path(calibration).read_text(encoding="utf-8"))
        if ranges.get("encoder_sha256") != encoder_digest(model.encoder):
            raise ValueError(f"{calibration} was calibrated for another encoder (SHA-256 of its weights differs)")
    return export(model, target, calibration=ranges, int8=int8)
