"""`captioner export RUN/best.pt OUT.pt`: a checkpoint for shipping: the training state (optimiser,
RNG) stripped, weights in fp16 by default, and the encoder's ImageNet tagger attached where the
encoder is the frozen pretrained one whose classifier head the tagger uses (`--no-tagger` leaves
it out). `Captioner.from_checkpoint` loads it back in fp32."""

from __future__ import annotations

import logging
from pathlib import Path

from captioner.checkpoint import load_checkpoint, save_checkpoint
from captioner.encoder import LITE_WHEELS
from captioner.tagger import Tagger

log = logging.getLogger(__name__)
TAGGED_BACKBONES = tuple(LITE_WHEELS)  # backbones whose ImageNet head ships with their weights


def export_checkpoint(source: str | Path, target: str | Path, *, half: bool = True, tagger: bool = True) -> int:
    payload = load_checkpoint(source)
    payload.pop("training", None)
    for key in ("format", "format_version"):
        payload.pop(key, None)
    provenance = payload.get("provenance") or {}
    payload["provenance"] = {**provenance, "torch": str(provenance.get("torch", ""))}
    encoder = payload["encoder"]
    if not tagger:
        payload.pop("tagger", None)
    elif encoder.get("backbone") in TAGGED_BACKBONES and not encoder.get("trainable_stages"):
        payload["tagger"] = Tagger.imagenet(encoder["backbone"]).to_dict()
    else:  # a fine-tuned trunk no longer feeds the head the features it was trained on
        log.warning("no tagger attached: the encoder is %s with %s trainable stages",
                    encoder.get("backbone"), encoder.get("trainable_stages"))
    save_checkpoint(payload, target, half=half)
    return Path(target).stat().st_size
