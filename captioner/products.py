"""Matrix products for inference in the precision an inference path runs: `Projection` is
y = x W^T + b with its weights prepared once (packed fp16, int8 or bf16). The decoder's word
steps and the tagger's head use it; training never does."""

from __future__ import annotations

import functools
import warnings

import torch

PRODUCTS = ("fp32", "bf16", "int8")  # the precision of decoding's matrix products (`Decoder.products`)


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

    BF16_ROWS = 16  # from 16 rows on the bf16 product beats the fp16-packed one (AVX-512 BF16: 2x at 48)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, products: str = "fp32"):
        """weight (out, in), bias (out,) or None."""
        weight, bias = weight.detach().float(), None if bias is None else bias.detach().float()
        self.packed = self.int8 = self.bf16 = self.weight = None
        self.bias = bias
        if products == "int8" and fbgemm_available(weight):
            scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
            with warnings.catch_warnings():  # quantized tensors are deprecated for new code, not removed
                warnings.simplefilter("ignore")
                quantized = torch.quantize_per_channel(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long),
                                                       0, torch.qint8)
                self.int8 = torch.ops.quantized.linear_prepack(quantized, bias)
        else:
            if products == "bf16" and weight.device.type == "cpu":
                self.bf16 = weight.t().contiguous().bfloat16()  # (in, out)
            if fbgemm_available(weight) and torch.equal(weight, weight.half().float()):
                self.packed = torch.ops.quantized.linear_prepack_fp16(weight, bias)
            elif self.bf16 is None:
                self.weight = weight.t().contiguous()  # (in, out): faster for few rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.int8 is not None:
            return _entry("linear_dynamic")(x, self.int8)
        if self.bf16 is not None and (x.shape[0] >= self.BF16_ROWS or self.packed is None):
            y = torch.mm(x.to(torch.bfloat16), self.bf16).float()
            return y if self.bias is None else y.add_(self.bias)
        if self.packed is not None:
            return _entry("linear_dynamic_fp16")(x, self.packed)
        return torch.mm(x, self.weight) if self.bias is None else torch.addmm(self.bias, x, self.weight)


@functools.cache
def _entry(name: str):
    """The C++ entry point of `torch.ops.quantized.<name>.default`. Calling the overload itself
    first checks in Python whether its arguments need Python dispatch (fake script objects,
    which inference never passes): 5-8 us of a 25 us product at batch 1."""
    overload = getattr(torch.ops.quantized, name).default
    return getattr(overload, "_op", overload)


def fbgemm_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and "fbgemm" in torch.backends.quantized.supported_engines
            and hasattr(torch.ops.quantized, "linear_prepack_fp16"))
