"""kimitune.ops.norm: the PyTorch references on the CPU, and fla-core's fused kernels against them on a GPU
(outputs and gradients, bf16 and float32, strided SwiGLU halves as the experts pass them)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops.norm import gated_rms_norm, gated_rms_norm_reference, rms_norm, rms_norm_reference, swiglu



def test_rms_norm_reference_values():
    x = torch.tensor([[3.0, 4.0]])
    weight = torch.tensor([1.0, 2.0])
    rms = (12.5 + 1e-6) ** 0.5
    assert torch.allclose(rms_norm(x, weight, 1e-6), torch.tensor([[3 / rms, 8 / rms]]))


def test_rms_norm_keeps_promotion_of_a_float32_weight_on_bf16_input():
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    assert rms_norm(x, torch.ones(8), 1e-6).dtype == torch.float32


def test_gated_rms_norm_reference_values():
    x = torch.tensor([[1.0, -1.0]])
    gate = torch.tensor([[0.0, 100.0]])
    out = gated_rms_norm(x, gate, torch.ones(2), 0.0)
    assert torch.allclose(out, torch.tensor([[0.5, -1.0]]))


def test_swiglu_on_cpu_is_silu_times_up():
    gate, up = torch.randn(5, 6), torch.randn(5, 6)
    assert torch.equal(swiglu(gate, up), F.silu(gate) * up)


def _grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    grad_out = torch.randn_like(out, generator=torch.Generator(out.device).manual_seed(3))
    out.backward(grad_out)
    return [out.detach()] + [t.grad for t in tensors]


def _assert_close(got, ref, tol):
    for g, r in zip(got, ref):
        err = ((g.double() - r.double()).norm() / r.double().norm().clamp_min(1e-12)).item()
        assert err < tol, err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_norms_match_the_reference_on_gpu(dtype):
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(3, 100, 2304, device="cuda", generator=gen).to(dtype)
    weight = (1 + 0.1 * torch.randn(2304, device="cuda", generator=gen)).to(dtype)
    eps = 1e-5
    _assert_close(_grads(lambda a, w: rms_norm(a, w, eps), x, weight),
                  _grads(lambda a, w: rms_norm_reference(a, w, eps), x, weight), tol)

    o = torch.randn(1, 100, 32, 128, device="cuda", generator=gen).to(dtype)
    gate = torch.randn(1, 100, 32, 128, device="cuda", generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(128, device="cuda", generator=gen)).to(dtype)
    _assert_close(_grads(lambda a, b, c: gated_rms_norm(a, b, c, eps), o, gate, w),
                  _grads(lambda a, b, c: gated_rms_norm_reference(a, b, c, eps), o, gate, w), tol)

    gate_up = torch.randn(777, 2 * 1024, device="cuda", generator=gen).to(dtype)
    _assert_close(_grads(lambda t: swiglu(*t.chunk(2, dim=-1)), gate_up),
                  _grads(lambda t: F.silu(t.chunk(2, dim=-1)[0]) * t.chunk(2, dim=-1)[1], gate_up), tol)
