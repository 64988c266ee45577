"""Inference paths: which precision and runtime compute the encoder, chosen once when a model loads.

    fp32   PyTorch eager, fp32: the reference every other path is measured against
    bf16   PyTorch eager, the encoder under bf16 autocast (native on CPUs with AVX-512 BF16 or AMX)
    int8   ONNX Runtime, the encoder quantised to int8 (static, per-channel weights, activation
           ranges calibrated on training photos by training/calibrate_int8.py); needs captioner[onnx].
           From a .pt checkpoint the int8 encoder is built at the first load and cached
           (`captioner.runtime.onnx_export.int8_encoder`); an ONNX export carries it.

The decoder keeps its own fast path in every case (fp16-packed weights, `captioner/decoder.py`);
an ONNX export (`captioner/runtime/onnxrt.py`) runs its word step in ONNX Runtime too. The encoder is most
of the cost, and its output feeds the decoder, the tagger and nothing else, so a path is a function
pixels (B, 3, S, S) uint8 -> regions (B, P, E), pooled (B, E) in fp32, whatever it computes inside.

`auto` (the default everywhere) takes the fastest path that this CPU runs natively and whose quality
was measured to hold: within `QUALITY_TOLERANCE` CIDEr-D of fp32 eager on the Flickr8k dev split
(`training/evaluate_paths.py`, figures in `MEASURED`). The decision and its reason travel with the
model (`Captioner.inference`, `describe()["inference"]`, `captioner info`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import cpu

PRECISIONS = ("auto", "fp32", "bf16", "int8")
QUALITY_TOLERANCE = 0.01  # CIDEr-D: a path may lose at most this much against fp32 eager
ONNX_EXTRA = "pip install 'captioner[onnx]'"

# What training/evaluate_paths.py measured on the Flickr8k dev split (1,000 photos, beam 3, tags on)
# with the bundled model against fp32 eager (CIDEr-D 0.5393 [0.5054, 0.5756]), each path's decoder
# products and tagger head in its own precision (`captioner/products.py`; 2026-12-07, an Intel Xeon
# without AMX): the change in CIDEr-D and the share of identical top captions; and what
# benchmarks/bench_inference.py measured end to end (beam 3, tags on, batch 16) against fp32 on the
# same runtime: fp32 eager for a .pt checkpoint ("pytorch"), the ONNX export's fp32 graphs for an
# ONNX model ("onnxruntime"), with the model bundled before it (the same architecture and
# vocabulary, so the same speed). CPU: 2 cores of an AMD EPYC with AVX-512 BF16 and VNNI, no AMX
# (2026-12-06, a shared machine: one run; runs vary by about 10%).
# `auto` trusts a path only on the backbone it was measured with.
MEASURED: dict[str, dict[str, Any]] = {
    "bf16": {"backbone": "efficientnet_lite0", "cider_delta": -0.0032, "identical": 0.902,
             "speedup_b16": {"pytorch": 1.58}},
    "int8": {"backbone": "efficientnet_lite0", "cider_delta": +0.0047, "identical": 0.734,
             "speedup_b16": {"pytorch": 2.47, "onnxruntime": 1.38}},
}

Encode = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass(frozen=True)
class InferencePath:
    """The path a model runs: `precision` (fp32, bf16, int8) on `runtime` (pytorch, onnxruntime),
    what the caller asked for, and why this path was taken."""

    precision: str
    runtime: str
    requested: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "cpu": cpu.capabilities()}


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    return precision


def choose_path(requested: str, *, device: torch.device, runtime: str, backbone: str,
                int8_unavailable: Callable[[], str | None]) -> InferencePath:
    """Decide the path. `runtime` is what the checkpoint runs on (pytorch for .pt files,
    onnxruntime for ONNX exports); `int8_unavailable()` says why no int8 encoder can be had (None
    when one can; asked only when int8 is in question). An explicit precision that cannot run
    here is a ValueError naming the fix."""
    check_precision(requested)
    if requested != "auto":
        return _explicit(requested, device, runtime, int8_unavailable)
    if device.type != "cpu":
        return InferencePath("fp32", runtime, requested, f"auto on {device.type}: fp32 (the lower-precision "
                             "paths were measured on CPUs)")
    reasons = []
    for precision in _fastest_first(runtime):
        problem = _auto_refuses(precision, runtime, backbone, int8_unavailable)
        if problem is None:
            measured = MEASURED[precision]
            speedup = measured["speedup_b16"][runtime]
            reference = "fp32 eager" if runtime == "pytorch" else "the ONNX export in fp32"
            why = (f"auto: {precision}, native on this CPU ({_flags_for(precision)}) and measured on Flickr8k dev "
                   f"within {QUALITY_TOLERANCE} CIDEr-D of fp32 ({measured['cider_delta']:+.4f}, "
                   f"{measured['identical']:.0%} identical top captions), {speedup:.2f}x {reference} end to end "
                   "at batch 16 where measured")
            # int8 runs the encoder on ONNX Runtime whatever the checkpoint: `runtime` names the encoder's
            return InferencePath(precision, "onnxruntime" if precision == "int8" else runtime, requested,
                                 "; ".join([why, *reasons]))
        reasons.append(f"not {precision}: {problem}")
    return InferencePath("fp32", runtime, requested, "; ".join(["auto: fp32", *reasons]))


def _explicit(precision: str, device: torch.device, runtime: str,
              int8_unavailable: Callable[[], str | None]) -> InferencePath:
    if precision == "fp32":
        return InferencePath("fp32", runtime, precision, "requested")
    if precision == "bf16":
        if runtime != "pytorch":
            raise ValueError("bf16 runs on PyTorch: load the .pt checkpoint for it (an ONNX export runs fp32 or int8)")
        if device.type == "cpu" and not cpu.native_bf16():
            return InferencePath("bf16", runtime, precision, "requested; this CPU has no bf16 instructions "
                                 "(AVX-512 BF16, AMX), so PyTorch emulates them and it runs slower than fp32")
        return InferencePath("bf16", runtime, precision, "requested")
    if device.type != "cpu":
        raise ValueError(f"int8 runs on the CPU with ONNX Runtime, not on {device.type}")
    problem = int8_unavailable()
    if problem is not None:
        raise ValueError(f"int8 is not available: {problem}")
    note = "" if cpu.native_int8() else ("; this CPU has no VNNI or AMX-INT8, so int8 products run in 16 bits "
                                          "and may be slower than fp32")
    return InferencePath("int8", "onnxruntime", precision, "requested" + note)


def _fastest_first(runtime: str) -> list[str]:
    """Measured paths, fastest first on `runtime` (a path without a measured speed comes last)."""
    return sorted(MEASURED, key=lambda p: -(MEASURED[p]["speedup_b16"].get(runtime) or 0.0))


def _auto_refuses(precision: str, runtime: str, backbone: str,
                  int8_unavailable: Callable[[], str | None]) -> str | None:
    """Why `auto` must not take `precision` here, or None."""
    measured = MEASURED[precision]
    if measured["cider_delta"] is None:
        return "its quality has not been measured"
    if measured["cider_delta"] < -QUALITY_TOLERANCE:
        return (f"it lost {-measured['cider_delta']:.4f} CIDEr-D against fp32 on Flickr8k dev "
                f"(more than {QUALITY_TOLERANCE})")
    if precision == "bf16" and runtime != "pytorch":
        return "bf16 runs on PyTorch, and this is an ONNX export"
    speedup = measured["speedup_b16"].get(runtime)
    if speedup is None or speedup <= 1.0:
        return (f"it was not faster than fp32 where it was measured ({speedup:.2f}x)" if speedup is not None
                else "its speed has not been measured")
    if backbone != measured["backbone"]:
        return f"measured with {measured['backbone']}, not {backbone}"
    native = cpu.native_bf16() if precision == "bf16" else cpu.native_int8()
    if not native:
        return f"this CPU has none of {', '.join(cpu.BF16_FLAGS if precision == 'bf16' else cpu.INT8_FLAGS)}"
    if precision == "int8":
        return int8_unavailable()
    return None


def _flags_for(precision: str) -> str:
    wanted = cpu.BF16_FLAGS if precision == "bf16" else cpu.INT8_FLAGS
    return ", ".join(flag for flag in wanted if flag in cpu.cpu_flags())


class EagerEncoder:
    """The fp32 and bf16 paths: pixels (B, 3, S, S) uint8 -> regions (B, P, E), pooled (B, E) in
    fp32, with PyTorch; `dtype=torch.bfloat16` runs the encoder under autocast (the convolutions in
    bf16, accumulating in fp32) and pools the fp32 regions."""

    def __init__(self, encoder, preprocessing, device: torch.device, dtype: torch.dtype | None = None):
        self.encoder, self.preprocessing, self.device, self.dtype = encoder, preprocessing, device, dtype

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normalized = self.preprocessing.normalize(pixels.to(self.device))
        if self.dtype is None:
            return self.encoder.extract(normalized)
        with torch.autocast(self.device.type, dtype=self.dtype):
            regions, _ = self.encoder.extract(normalized)
        regions = regions.float()  # (B, P, E)
        return regions, regions.mean(dim=1)
