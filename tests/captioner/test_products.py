import pytest
import torch

from captioner.products import Projection, fbgemm_available, product
from captioner.scripting import scripted
from tests.conftest import needs_torchscript


def _expected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, products: str) -> torch.Tensor:
    """What each path's product is meant to be, each operator called directly (eager)."""
    fp16_weights = torch.equal(weight, weight.half().float())
    if products == "int8" and fbgemm_available(weight):
        packed = Projection(weight, bias, "int8").parts[0]  # the path's own quantisation of the weights
        return torch.ops.quantized.linear_dynamic(x, packed)
    if products == "bf16" and (x.shape[0] >= 16 or not fp16_weights):
        y = torch.mm(x.bfloat16(), weight.t().contiguous().bfloat16()).float()
        return y if bias is None else y + bias
    if fp16_weights and fbgemm_available(weight):
        return torch.ops.quantized.linear_dynamic_fp16(x, torch.ops.quantized.linear_prepack_fp16(weight, bias))
    matrix = weight.t().contiguous()  # (in, out), as kept for few rows
    return torch.mm(x, matrix) if bias is None else torch.addmm(bias, x, matrix)


@needs_torchscript
@pytest.mark.parametrize("products", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("fp16_weights", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_every_product_is_the_operator_its_path_names_bit_for_bit(products, fp16_weights, with_bias, rows):
    """`Projection` runs one scripted rule for every path; each of its branches must give
    exactly what calling that operator directly gives (TorchScript may not rewrite it)."""
    torch.manual_seed(rows)
    weight, bias = torch.randn(40, 24), torch.randn(40) if with_bias else None
    if fp16_weights:
        weight = weight.half().float()
    x = torch.randn(rows, 24)
    projection = Projection(weight, bias, products)
    assert isinstance(scripted(product), torch.jit.ScriptFunction)  # compiled, not the Python fallback
    assert torch.equal(projection(x), _expected(x, weight, bias, products))
    assert torch.equal(product(x, projection.parts), projection(x))  # the Python fallback: the same numbers
