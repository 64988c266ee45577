"""`captioner export RUN/best.pt OUT.pt`: a checkpoint for shipping: the training state (optimiser,
RNG) stripped, weights in fp16 by default. `Captioner.from_checkpoint` loads it back in fp32."""

from __future__ import annotations

from pathlib import Path

from captioner.checkpoint import load_checkpoint, save_checkpoint


def export_checkpoint(source: str | Path, target: str | Path, *, half: bool = True) -> int:
    payload = load_checkpoint(source)
    payload.pop("training", None)
    for key in ("format", "format_version"):
        payload.pop(key, None)
    provenance = payload.get("provenance") or {}
    payload["provenance"] = {**provenance, "torch": str(provenance.get("torch", ""))}
    save_checkpoint(payload, target, half=half)
    return Path(target).stat().st_size
