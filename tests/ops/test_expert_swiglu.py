"""kimitune.ops.expert_swiglu: the reference against the formula, the Triton kernels against the reference (in
Triton's CPU interpreter here, compiled on a GPU), and the weighting's place in the MoE layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted, run_interpreted

from kimitune.ops.expert_swiglu import (
    expert_swiglu,
    expert_swiglu_backward_triton,
    expert_swiglu_forward_triton,
    expert_swiglu_reference,
)


def case(rows=7, width=37, dtype=torch.float32, device="cpu", seed=0):
    """gate_up [rows, 2 * width], weights [rows] float32, grad_h [rows, width]."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (2 * torch.randn(rows, 2 * width, generator=gen)).to(dtype)
    weights = torch.rand(rows, generator=gen)
    grad_h = torch.randn(rows, width, generator=gen).to(dtype)
    return gate_up.to(device), weights.to(device), grad_h.to(device)


def reference_with_grads(gate_up, weights, grad_h):
    gu, w = gate_up.clone().requires_grad_(), weights.clone().requires_grad_()
    h = expert_swiglu_reference(gu, w)
    h.backward(grad_h)
    return h.detach(), gu.grad, w.grad


def test_reference_is_the_weighted_swiglu():
    gate_up, weights, _ = case(dtype=torch.float64)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(expert_swiglu_reference(gate_up, weights), F.silu(gate) * up * weights[:, None])


def test_cpu_tensors_take_the_reference():
    gate_up, weights, _ = case()
    assert torch.equal(expert_swiglu(gate_up, weights), expert_swiglu_reference(gate_up, weights))


def test_bad_shapes_are_refused():
    gate_up, weights, _ = case()
    with pytest.raises(ValueError, match=r"must be \[M, 2I\]"):
        expert_swiglu_forward_triton(gate_up, weights[:-1])


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


def assert_kernels_match_reference(gate_up, weights, grad_h):
    h, grad_gate_up, grad_w = reference_with_grads(gate_up, weights, grad_h)
    got_h = expert_swiglu_forward_triton(gate_up, weights)
    got_grad_gate_up, got_grad_w = expert_swiglu_backward_triton(gate_up, weights, grad_h)
    # The kernels keep float32 throughout; the bf16 reference's autograd rounds its intermediates' gradients to bf16.
    tol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 2e-2)}[gate_up.dtype]
    torch.testing.assert_close(got_h, h, rtol=tol[0], atol=tol[1])
    torch.testing.assert_close(got_grad_gate_up, grad_gate_up, rtol=tol[0], atol=tol[1])
    assert got_grad_w.dtype == torch.float32
    torch.testing.assert_close(got_grad_w, grad_w, rtol=tol[0], atol=tol[1] * 10)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [37, 1024, 1500])
def test_interpreted_kernels_match_reference(dtype, width):
    assert_kernels_match_reference(*case(width=width, dtype=dtype))


@interpreted
def test_interpreted_kernels_with_no_rows():
    gate_up, weights, grad_h = case(rows=0)
    assert expert_swiglu_forward_triton(gate_up, weights).shape == (0, 37)
    grad_gate_up, grad_w = expert_swiglu_backward_triton(gate_up, weights, grad_h)
    assert grad_gate_up.shape == (0, 74) and grad_w.shape == (0,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernels_match_reference_on_cuda():
    assert_kernels_match_reference(*case(rows=4096, width=1024, dtype=torch.bfloat16, device="cuda"))
    gate_up, weights, grad_h = case(rows=64, width=1024, dtype=torch.bfloat16, device="cuda")
    gu, w = gate_up.clone().requires_grad_(), weights.clone().requires_grad_()
    expert_swiglu(gu, w).backward(grad_h)  # the autograd function on CUDA
    assert gu.grad.shape == gate_up.shape and w.grad.dtype == torch.float32
