"""The grouped product with 8-bit weights dequantised in the kernel against the dequantise-then-matmul reference
(Triton's interpreter on the CPU; the real kernel on a GPU)."""

from __future__ import annotations

import pytest
import torch

from kimitune.ops.quant_grouped_mm import (
    row_scaled_grouped_mm,
    row_scaled_grouped_mm_fp8_reference,
    row_scaled_grouped_mm_reference,
)
from kimitune.quant.formats import quantize_fp8, quantize_int8
from tests.ops.triton_interpreter import interpreted, run_interpreted


def stack(fmt: str, experts: int, rows: int, cols: int, device: str):
    w = torch.randn(experts, rows, cols, device=device) * 0.05
    q, scale = quantize_fp8(w) if fmt == "fp8" else quantize_int8(w)
    return (q.view(torch.uint8) if fmt == "fp8" else q), scale


def offsets_of(counts: list[int], device: str) -> torch.Tensor:
    return torch.tensor(counts, device=device).cumsum(0).to(torch.int32)


CASES = [  # (format, transpose, expert row counts): empty experts, one longer than a tile, uneven ends
    ("fp8", True, [5, 0, 70, 1]),
    ("fp8", False, [0, 33, 2, 0]),
    ("int8", True, [17, 3, 0, 66]),
    ("int8", False, [1, 0, 0, 90]),
]


def check(fmt, transpose, counts, device, dtype, tolerance):
    torch.manual_seed(0)
    experts, rows_w, cols_w = len(counts), 48, 80  # widths that are not multiples of the tiles
    q, scale = stack(fmt, experts, rows_w, cols_w, device)
    a = torch.randn(sum(counts), cols_w if transpose else rows_w, device=device).to(dtype)
    offsets = offsets_of(counts, device)
    got = row_scaled_grouped_mm(a, q, scale, offsets, transpose, fmt == "int8")
    want = row_scaled_grouped_mm_reference(a.float(), q, scale, offsets, transpose, fmt == "int8")
    assert got.shape == want.shape and got.dtype == dtype
    error = ((got.float() - want).norm() / want.norm()).item()
    assert error < tolerance, error


@interpreted
@pytest.mark.parametrize("fmt,transpose,counts", CASES)
def test_interpreted_kernel_equals_the_dequantising_reference(fmt, transpose, counts):
    check(fmt, transpose, counts, "cpu", torch.float32, 1e-5)


FP8_CASES = [(True, [5, 0, 70, 1]), (False, [0, 33, 2, 40])]


def e4m3_exact_rows(rows: int, width: int, seed: int) -> torch.Tensor:
    """Activations whose every row and 128-column block scales to e4m3 values exactly (e4m3 values times a power of
    two, one of them 448 times it): Triton's interpreter rounds some float32 -> e4m3 casts just below a power of two
    down to half the value, so its run checks the kernel on values that need no rounding."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, width, generator=generator).to(torch.float8_e4m3fn).float()
    for k0 in range(0, width, 128):
        a[:, k0] = 448.0 * torch.where(torch.rand(rows, generator=generator) < 0.5, -1.0, 1.0)
        a[:, k0:k0 + 128] *= 2.0 ** torch.randint(-12, -4, (rows, 1), generator=generator).float()
    return a


def check_fp8_products(transpose, counts, device, dtype, tolerance, exact_inputs=False):
    """FP8 products (e4m3 by e4m3) against their reference; widths that span two activation blocks and a part."""
    torch.manual_seed(0)
    experts, rows_w, cols_w = len(counts), 136, 300
    q, scale = stack("fp8", experts, rows_w, cols_w, device)
    width = cols_w if transpose else rows_w
    if exact_inputs:  # see e4m3_exact_rows; one power of two per expert keeps dY * scale exact too
        a = e4m3_exact_rows(sum(counts), width, 0)
        scale = (2.0 ** torch.arange(-9, -9 + experts).float())[:, None].expand(experts, rows_w).contiguous()
    else:
        a = torch.randn(sum(counts), width)
        a[:, :7] *= 30.0  # a few large columns: each block's scale follows its own
    a, scale = a.to(device=device, dtype=dtype), scale.to(device)
    offsets = offsets_of(counts, device)
    got = row_scaled_grouped_mm(a, q, scale, offsets, transpose, False, fp8_products=True)
    want = row_scaled_grouped_mm_fp8_reference(a, q, scale, offsets, transpose)
    exact = row_scaled_grouped_mm_reference(a.float(), q, scale, offsets, transpose, False)
    assert got.shape == want.shape and got.dtype == dtype
    error = ((got.float() - want).norm() / want.norm()).item()
    assert error < tolerance, error
    # and near the dequantising product: e4m3 activations (3 mantissa bits) cost a few per cent
    assert ((want - exact).norm() / exact.norm()).item() < 0.05


@interpreted
@pytest.mark.parametrize("transpose,counts", FP8_CASES)
def test_interpreted_fp8_products_equal_their_reference(transpose, counts):
    check_fp8_products(transpose, counts, "cpu", torch.float32, 1e-5, exact_inputs=True)


def test_fp8_products_take_no_int8_stack():
    q, scale = stack("int8", 2, 16, 32, "cpu")
    with pytest.raises(ValueError, match="not int8"):
        row_scaled_grouped_mm(torch.randn(4, 32), q, scale, offsets_of([2, 2], "cpu"), True, True, fp8_products=True)


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


def test_reference_dequantises_as_the_formats_do():
    from kimitune.quant.formats import dequantize_fp8, dequantize_int8

    torch.manual_seed(1)
    for fmt, dequantize in (("fp8", lambda q, s: dequantize_fp8(q.view(torch.float8_e4m3fn), s, torch.float32)),
                            ("int8", lambda q, s: dequantize_int8(q, s, torch.float32))):
        q, scale = stack(fmt, 2, 16, 32, "cpu")
        a = torch.randn(7, 32)
        offsets = offsets_of([3, 4], "cpu")
        w = dequantize(q, scale)
        want = torch.cat([a[:3] @ w[0].T, a[3:] @ w[1].T])
        torch.testing.assert_close(row_scaled_grouped_mm_reference(a, q, scale, offsets, True, fmt == "int8"), want)


def test_bad_shapes_are_named():
    q, scale = stack("fp8", 2, 16, 32, "cpu")
    with pytest.raises(ValueError, match="row_scaled_grouped_mm"):
        row_scaled_grouped_mm(torch.randn(4, 16), q, scale, offsets_of([2, 2], "cpu"), True, False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt,transpose,counts", CASES + [("fp8", True, [300, 0, 1000, 5]), ("int8", False, [257, 511, 0, 3])])
def test_gpu_kernel_equals_the_dequantising_reference(fmt, transpose, counts):
    check(fmt, transpose, counts, "cuda", torch.bfloat16, 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transpose,counts", FP8_CASES + [(True, [300, 0, 1000, 5]), (False, [257, 511, 0, 3])])
def test_gpu_fp8_products_equal_their_reference(transpose, counts):
    check_fp8_products(transpose, counts, "cuda", torch.bfloat16, 1e-2)
