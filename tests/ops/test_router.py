"""kimitune.ops.router: float32 router logits, on tensor cores for bf16 input on CUDA."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops.router import router_logits


def inputs(device="cpu", dtype=torch.bfloat16, tokens=64, hidden=96, experts=32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(device, dtype)
    weight = (torch.randn(experts, hidden, generator=gen) / hidden**0.5).to(device, dtype)
    return x, weight


def test_cpu_upcasts_both_operands():
    x, weight = inputs()
    logits = router_logits(x, weight)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, F.linear(x.float(), weight.float()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_trains", [False, True])
def test_cuda_bf16_logits_and_gradients_match_the_float32_product(weight_trains):
    x, weight = inputs("cuda", tokens=4096, hidden=2304, experts=256)
    x.requires_grad_(True)
    weight.requires_grad_(weight_trains)
    grad = torch.randn(4096, 256, device="cuda")
    logits = router_logits(x, weight)
    logits.backward(grad)
    x32, w32 = x.detach().float().requires_grad_(True), weight.detach().float().requires_grad_(weight_trains)
    expected = F.linear(x32, w32)
    expected.backward(grad)
    assert logits.dtype == torch.float32
    # Products of bf16 numbers are exact in float32: only the order of the sums differs.
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=1.6e-2, atol=1e-2)
    if weight_trains:
        torch.testing.assert_close(weight.grad.float(), w32.grad, rtol=1.6e-2, atol=1e-2)
