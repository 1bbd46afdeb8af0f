"""kimitune.ops.short_conv: the Triton kernels against the PyTorch short conv (in Triton's CPU interpreter here,
compiled on a GPU), packed sequences included, and the CUDA dispatch of ``causal_conv1d``."""

from __future__ import annotations

import pytest
import torch
from triton_interpreter import interpreted, run_interpreted

from kimitune.ops.conv import causal_conv1d_reference
from kimitune.ops.conv import sequence_positions
from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.short_conv import conv_silu


def case(T=150, D=200, W=4, dtype=torch.float32, device="cpu", seed=0):
    """x [1, T, D], weight [D, W], grad_y [1, T, D]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, D, generator=gen).to(dtype)
    weight = (0.5 * torch.randn(D, W, generator=gen)).to(dtype)
    grad_y = torch.randn(1, T, D, generator=gen).to(dtype)
    return x.to(device), weight.to(device), grad_y.to(device)


def with_grads(fn, x, weight, grad_y, *args):
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    y = fn(x, weight, *args)
    y.backward(grad_y)
    return y.detach(), x.grad, weight.grad


def reference(x, weight, cu_seqlens):
    return causal_conv1d_reference(x, weight, activation="silu", cu_seqlens=cu_seqlens)[0]


def assert_matches_reference(x, weight, grad_y, cu_seqlens):
    got = with_grads(conv_silu, x, weight, grad_y, cu_seqlens)
    expected = with_grads(reference, x.double(), weight.double(), grad_y.double(),
                          None if cu_seqlens is None else cu_seqlens.cpu())
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[x.dtype]
    for a, b in zip(got, expected):
        assert a.dtype == x.dtype
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=tol, atol=tol * 4)


# Sequences shorter than the taps, one of exactly W, tile edges crossed (BLOCK_T = 64), a last partial tile.
PACKED = [0, 2, 6, 70, 135, 150]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [False, True])
def test_interpreted_kernels_match_reference(dtype, packed):
    cu_seqlens = torch.tensor(PACKED, dtype=torch.int32) if packed else None
    assert_matches_reference(*case(dtype=dtype), cu_seqlens)


@interpreted
def test_interpreted_batch_rows_are_separate_sequences():
    x, weight, grad_y = case(T=70)
    x, grad_y = x.expand(3, -1, -1).contiguous(), grad_y.expand(3, -1, -1).contiguous()
    assert_matches_reference(x, weight, grad_y, None)


@interpreted
def test_interpreted_frozen_weight_gets_no_gradient():
    x, weight, grad_y = case()
    x = x.requires_grad_()
    conv_silu(x, weight).backward(grad_y)
    assert weight.grad is None and x.grad is not None


def split_three(fn):
    """fn's output as the three parts, joined again (for ``with_grads``), after checking what conv_silu returns."""
    def run(x, weight, cu_seqlens):
        parts = fn(x, weight, cu_seqlens)
        assert len(parts) == 3 and all(p.is_contiguous() and p.shape == (*x.shape[:2], x.shape[2] // 3) for p in parts)
        return torch.cat(parts, dim=-1)
    return run


def assert_split_matches_reference(x, weight, grad_y, cu_seqlens):
    got = with_grads(split_three(lambda *a: conv_silu(*a, parts=3)), x, weight, grad_y, cu_seqlens)
    expected = with_grads(reference, x.double(), weight.double(), grad_y.double(),
                          None if cu_seqlens is None else cu_seqlens.cpu())
    tol = {torch.float32: 1e-4, torch.bfloat16: 2e-2}[x.dtype]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.double().cpu(), b.cpu(), rtol=tol, atol=tol * 4)


@interpreted
@pytest.mark.parametrize("packed", [False, True])
def test_interpreted_output_in_three_contiguous_parts(packed):
    # 192 channels: parts of 64, so a block of 128 channels spans two parts.
    cu_seqlens = torch.tensor(PACKED, dtype=torch.int32) if packed else None
    assert_split_matches_reference(*case(D=192), cu_seqlens)


def test_channels_that_do_not_split_are_refused():
    x, weight, _ = case(D=200)
    with pytest.raises(ValueError, match="200 channels do not split into 3 parts"):
        conv_silu(x, weight, parts=3)


def test_a_layout_makes_its_positions_once():
    layout = BatchLayout.of(torch.tensor([0, 3, 10], dtype=torch.int32), "cpu")
    first = layout.positions
    assert first.dtype == torch.int32 and first.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert layout.positions is first
    assert torch.equal(first, sequence_positions(1, 10, layout.cu_seqlens, "cpu").to(torch.int32))
    assert (layout.total, layout.max_seqlen, layout.last_tokens.tolist()) == (10, 7, [2, 9])


def test_kernels_in_the_interpreter():
    run_interpreted(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("packed", [False, True])
def test_kernels_match_reference_on_cuda(packed):
    cu_seqlens = torch.tensor([0, 3, 1000, 4096], dtype=torch.int32, device="cuda") if packed else None
    assert_matches_reference(*case(T=4096, D=12288, dtype=torch.bfloat16, device="cuda"), cu_seqlens)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_three_parts_match_reference_on_cuda():
    assert_split_matches_reference(*case(T=4096, D=12288, dtype=torch.bfloat16, device="cuda"), None)


def test_bounds_on_another_device_than_the_tensors_are_refused():
    with pytest.raises(ValueError, match="cu_seqlens is on meta, the tensors on cpu: give it on the host or on their"):
        BatchLayout.of(torch.tensor([0, 4], device="meta"), "cpu", total=4)
