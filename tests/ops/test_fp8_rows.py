"""The one-kernel e4m3 row quantisation against kimitune.quant.formats.quantize_rows_fp8 (Triton's interpreter on
the CPU; the real kernel on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kimitune.ops.fp8_rows import quantize_rows_e4m3
from kimitune.quant.formats import FP8_MAX, quantize_rows_fp8
from tests.ops.triton_interpreter import interpreted, run_interpreted


def check(device: str, dtype: torch.dtype, columns: bool, exact: bool = True):
    torch.manual_seed(0)
    x = (torch.randn(5, 3000, device=device) * torch.logspace(-3, 2, 5, device=device)[:, None]).to(dtype)
    x[2] = 0  # a row of zeros: scale 1, zeros stay zeros
    column_scale = torch.rand(3000, device=device) + 0.5 if columns else None
    q, scale = quantize_rows_e4m3(x, column_scale, FP8_MAX)
    want_q, want_scale = quantize_rows_fp8(x.float() if column_scale is None else x.float() * column_scale)
    torch.testing.assert_close(scale, want_scale, rtol=0, atol=0)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    if exact:
        assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))
        return
    # Triton's interpreter rounds float32 -> e4m3 in NumPy and loses the carry into the exponent: a value that
    # rounds up to a power of two comes out as half of it. Those are the only differences allowed here; the GPU
    # test below holds the hardware conversion to every bit.
    got, want = q.float(), want_q.float()
    wrong = got != want
    powers = torch.log2(want.abs()).frac() == 0
    assert torch.all(powers[wrong] & (got[wrong] * 2 == want[wrong])), (got[wrong][:5], want[wrong][:5])


@interpreted
@pytest.mark.parametrize("columns", [False, True])
def test_interpreted_kernel_equals_the_reference(columns):
    check("cpu", torch.float32, columns, exact=False)


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="quantize_rows_e4m3"):
        quantize_rows_e4m3(torch.randn(2, 8), torch.ones(4), FP8_MAX)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("columns", [False, True])
def test_gpu_kernel_equals_the_reference(columns):
    check("cuda", torch.bfloat16, columns)
