"""grouped_linear: torch._grouped_mm and the per-expert loop against a plain per-expert matmul."""

from __future__ import annotations

import pytest
import torch

from kimitune.ops.grouped_mm import _grouped_mm_supported, grouped_linear, grouped_linear_reference


def reference(x, weight, counts):
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start:start + n] @ weight[e].T)
        start += n
    return torch.cat(out)


def case(dtype, counts=(3, 0, 5, 1), dim_in=16, dim_out=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), dim_in, generator=generator).to(dtype)
    weight = torch.randn(len(counts), dim_out, dim_in, generator=generator).to(dtype)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, weight, offsets, list(counts)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", [grouped_linear, grouped_linear_reference])
def test_forward_and_backward_match_per_expert_matmuls(impl, dtype):
    x, weight, offsets, counts = case(dtype)
    if impl is grouped_linear:
        assert _grouped_mm_supported(x, weight)  # CPU, 16-byte aligned rows: the grouped kernel runs
    x1, w1 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    x2, w2 = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y1, y2 = impl(x1, w1, offsets), reference(x2, w2, counts)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y1, y2, **tol)
    grad = torch.randn_like(y1)
    y1.backward(grad)
    y2.backward(grad)
    torch.testing.assert_close(x1.grad, x2.grad, **tol)
    torch.testing.assert_close(w1.grad, w2.grad, **tol)


def test_unaligned_sizes_fall_back_to_the_loop():
    x, weight, offsets, counts = case(torch.float32, dim_in=6, dim_out=5)
    assert not _grouped_mm_supported(x, weight)
    torch.testing.assert_close(grouped_linear(x, weight, offsets), reference(x, weight, counts))


def test_mixed_dtypes_compute_in_the_promoted_dtype():
    x, weight, offsets, counts = case(torch.float32)
    out = grouped_linear(x.to(torch.bfloat16), weight, offsets)
    assert out.dtype == torch.float32


def test_shapes_are_checked():
    x, weight, offsets, _ = case(torch.float32)
    with pytest.raises(ValueError, match="one end per expert"):
        grouped_linear(x, weight, offsets[:2])
    with pytest.raises(ValueError, match=r"\[N, in\]"):
        grouped_linear(x[:, :4], weight, offsets)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_grouped_mm_matches_the_loop():
    x, weight, offsets, counts = case(torch.bfloat16, counts=(64, 0, 130, 7), dim_in=256, dim_out=128)
    x, weight, offsets = x.cuda().requires_grad_(), weight.cuda().requires_grad_(), offsets.cuda()
    y = grouped_linear(x, weight, offsets)
    expected = grouped_linear_reference(x, weight, offsets)
    torch.testing.assert_close(y, expected, rtol=2e-2, atol=2e-2)
    grad = torch.randn_like(y)
    (gx, gw), (ex, ew) = (torch.autograd.grad(out, (x, weight), grad) for out in (y, expected))
    torch.testing.assert_close(gx, ex, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw, ew, rtol=2e-2, atol=5e-2)
