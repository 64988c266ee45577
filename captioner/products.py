"""Matrix products for inference in the precision an inference path runs: `Projection` is
y = x W^T + b with its weights prepared once (packed fp16, int8 or bf16). The decoder's word
steps and the tagger's head use it; training never does."""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch

from .scripting import scripted

PRODUCTS = ("fp32", "bf16", "int8")  # the precision of decoding's matrix products (`Decoder.products`)

try:
    Packed = torch.classes.quantized.LinearPackedParamsBase  # fbgemm's prepacked weights, int8 or fp16
except (AttributeError, RuntimeError):  # a torch without them: products take the matrix, in Python
    Packed = Any
# A projection's parts: packed weights (bias included), whether they are int8, the weight as an
# (in, out) matrix (bf16 or fp32), and the bias that goes with the matrix.
ProductParts = Tuple[Optional[Packed], bool, Optional[torch.Tensor], Optional[torch.Tensor]]


class Projection:
    """y = x W^T + b for decoding, in the precision `products` names:

    - fp32: weights whose values are all exactly representable in fp16 (every checkpoint exported
      or bundled in fp16) are packed for fbgemm's fp16-weight product, which reads half the bytes
      and computes in fp32: the same result up to summation order, and for the few rows of
      small-batch decoding about twice as fast as the fp32 product;
    - int8: fbgemm's dynamic int8 product (weights per output channel, each input row batch
      quantised on the fly), 2-3x faster again on VNNI CPUs;
    - bf16: the product in bf16 (oneDNN), accumulated in fp32, for 16 rows and more; fewer rows
      (batch 1) take the fp16-packed weights, which converting to bf16 would only slow down.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, products: str = "fp32"):
        """weight (out, in), bias (out,) or None."""
        weight, bias = weight.detach().float(), None if bias is None else bias.detach().float()
        packed = matrix = None
        int8 = products == "int8" and fbgemm_available(weight)
        if int8:
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
            with warnings.catch_warnings():  # quantized tensors are deprecated for new code, not removed
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                       0, torch.qint8)
                packed = torch.ops.quantized.linear_prepack(quantized, bias)
        else:
            if products == "bf16" and weight.device.type == "cpu":
                matrix = weight.t().contiguous().bfloat16()  # (in, out)
            if fbgemm_available(weight) and torch.equal(weight, weight.half().float()):
                packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
            elif matrix is None:
                matrix = weight.t().contiguous()  # (in, out): faster for few rows
        self.parts: ProductParts = (packed, int8, matrix, bias)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out)."""
        return scripted(product)(x, self.parts)


def product(x: torch.Tensor, parts: ProductParts) -> torch.Tensor:
    """y = x W^T + b from a `Projection`'s parts (packed, int8, matrix, bias): fbgemm's packed
    weights (bias included) where there are any, except that a bf16 matrix takes 16 rows and
    more; else the (in, out) matrix, in its own dtype, then the bias. Written for TorchScript
    (`Projection` calls it scripted; the decoder's scripted step calls it inline)."""
    packed, int8, matrix, bias = parts
    # from 16 rows on, the bf16 product beats the fp16-packed one (AVX-512 BF16: 2x at 48 rows)
    if packed is not None and (matrix is None or x.shape[0] < 16):
        if int8:
            return torch.ops.quantized.linear_dynamic(x, packed)
        return torch.ops.quantized.linear_dynamic_fp16(x, packed)
    assert matrix is not None
    if matrix.dtype == x.dtype:  # linear, not addmm, which TorchScript splits into mm and add
        return torch.nn.functional.linear(x, matrix.t(), bias)
    y = torch.mm(x.to(matrix.dtype), matrix).to(x.dtype)
    return y if bias is None else y.add_(bias)


def fbgemm_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16"))
