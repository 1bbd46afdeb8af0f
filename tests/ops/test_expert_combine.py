"""kimitune.ops.expert_combine: the PyTorch reference against the formula, and the Triton kernels against the
reference (under Triton's CPU interpreter here, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import interpreted, run_interpreted

from kimitune.ops.expert_combine import (
    combine_backward_triton,
    combine_experts,
    combine_experts_reference,
    combine_forward_triton,
)
from kimitune.ops.permute import inverse_permutation


def case(tokens=5, k=3, width=37, num_experts=4, dtype=torch.float32, device="cpu", seed=0):
    """expert_out [tokens * k, width] sorted by expert, weights [tokens, k], order, inverse, grad_y [tokens, width]."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.randint(0, num_experts, (tokens * k,), generator=gen), stable=True)
    expert_out = torch.randn(tokens * k, width, generator=gen).to(dtype)
    weights = torch.rand(tokens, k, generator=gen).to(dtype)
    grad_y = torch.randn(tokens, width, generator=gen).to(dtype)
    return [t.to(device) for t in (expert_out, weights, order, inverse_permutation(order), grad_y)]


def reference_with_grads(expert_out, weights, order, inverse, grad_y):
    out, w = expert_out.clone().requires_grad_(), weights.clone().requires_grad_()
    y = combine_experts_reference(out, w, order, inverse)
    y.backward(grad_y)
    return y.detach(), out.grad, w.grad


def test_reference_is_the_weighted_sum_of_each_tokens_copies():
    expert_out, weights, order, inverse, _ = case(dtype=torch.float64)
    y = combine_experts_reference(expert_out, weights, order, inverse)
    tokens, k = weights.shape
    for n in range(tokens):
        # Copy n * k + j sits at row inverse[n * k + j] of the expert-sorted rows.
        expected = sum(weights[n, j] * expert_out[inverse[n * k + j]] for j in range(k))
        torch.testing.assert_close(y[n], expected)


def test_cpu_tensors_take_the_reference():
    expert_out, weights, order, inverse, _ = case()
    assert torch.equal(combine_experts(expert_out, weights, order, inverse),
                       combine_experts_reference(expert_out, weights, order, inverse))


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


def assert_kernels_match_reference(expert_out, weights, order, inverse, grad_y):
    y, grad_out, grad_w = reference_with_grads(expert_out, weights, order, inverse, grad_y)
    got_y = combine_forward_triton(expert_out, weights, inverse)
    got_grad_out, got_grad_w = combine_backward_triton(expert_out, weights, inverse, grad_y)
    # Both sum in float32; the reference rounds grad_w to the inputs' dtype, the kernel keeps float32.
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2)}[expert_out.dtype]
    torch.testing.assert_close(got_y, y, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(got_grad_out, grad_out, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(got_grad_w.to(grad_w.dtype), grad_w, rtol=tol[0], atol=tol[1] * 10)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, width", [(3, 37), (8, 1000), (1, 16)])
def test_interpreted_kernels_match_reference(dtype, k, width):
    assert_kernels_match_reference(*case(k=k, width=width, dtype=dtype))


@interpreted
def test_interpreted_kernels_with_no_tokens():
    expert_out, weights, _, inverse, grad_y = case(tokens=0)
    assert combine_forward_triton(expert_out, weights, inverse).shape == (0, 37)
    grad_out, grad_w = combine_backward_triton(expert_out, weights, inverse, grad_y)
    assert grad_out.shape == (0, 37) and grad_w.shape == (0, 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_reference_on_cuda():
    assert_kernels_match_reference(*case(tokens=512, k=8, width=2304, num_experts=256, dtype=torch.bfloat16,
                                         device="cuda"))
    expert_out, weights, order, inverse, grad_y = case(tokens=64, k=8, width=2304, dtype=torch.bfloat16,
                                                       device="cuda")
    out = expert_out.clone().requires_grad_()
    combine_experts(out, weights, order, inverse).backward(grad_y)  # the autograd function on CUDA
    assert out.grad is not None and out.grad.shape == expert_out.shape
