"""kimitune.ops.softmax_grad: the PyTorch reference against autograd through F.cross_entropy, and the Triton kernel
against the reference (under Triton's CPU interpreter here, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from triton_interpreter import interpreted, run_interpreted

from kimitune.ops.softmax_grad import softmax_grad_, softmax_grad_reference_, softmax_grad_triton_


def case(rows=6, vocab=1000, dtype=torch.float32, spread=3.0, device="cpu", seed=0):
    """Logits [rows, vocab], targets [rows] hitting the first and last column, valid [rows] with one row off."""
    generator = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=generator) * spread).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[0], targets[-1] = 0, vocab - 1
    valid = torch.ones(rows, dtype=torch.bool)
    valid[1] = False
    return logits.to(device), targets.to(device), valid.to(device)


def autograd_truth(logits, targets, valid, scale):
    """(lse, target logit, gradient of sum(CE * valid * scale)) in float64 through autograd."""
    x = logits.double().requires_grad_()
    (F.cross_entropy(x, targets, reduction="none") * valid * scale).sum().backward()
    return torch.logsumexp(x.detach(), -1), x.detach().gather(1, targets[:, None]).squeeze(1), x.grad


@pytest.mark.parametrize("valid_mask", [True, False])
def test_reference_matches_autograd(valid_mask):
    logits, targets, valid = case()
    lse, target_logit, grad = autograd_truth(logits, targets, valid if valid_mask else torch.ones_like(valid), 0.25)
    chunk = logits.clone()
    got_lse, got_target = softmax_grad_reference_(chunk, targets, valid if valid_mask else None, scale=0.25)
    torch.testing.assert_close(got_lse.double(), lse)
    torch.testing.assert_close(got_target.double(), target_logit)
    torch.testing.assert_close(chunk.double(), grad)
    if valid_mask:
        assert not chunk[1].any()


def test_reference_without_grad_leaves_the_logits():
    logits, targets, _ = case(dtype=torch.bfloat16)
    chunk = logits.clone()
    lse, _ = softmax_grad_reference_(chunk, targets, write_grad=False)
    assert torch.equal(chunk, logits)
    torch.testing.assert_close(lse, torch.logsumexp(logits.float(), -1))


def test_dispatch_uses_the_reference_on_cpu():
    logits, targets, valid = case()
    a, b = logits.clone(), logits.clone()
    for x, y in zip(softmax_grad_(a, targets, valid, 0.5), softmax_grad_reference_(b, targets, valid, 0.5)):
        assert torch.equal(x, y)
    assert torch.equal(a, b)


def test_kernel_in_the_interpreter():
    run_interpreted(__file__)


def assert_matches_reference(logits, targets, valid, scale, write_grad, block_v=None):
    """The kernel's lse, target logits and rewritten chunk against the reference's, on copies of ``logits``."""
    ref_chunk, got_chunk = logits.clone(), logits.clone()
    ref = softmax_grad_reference_(ref_chunk, targets, valid, scale, write_grad)
    got = softmax_grad_triton_(got_chunk, targets, valid, scale, write_grad, block_v=block_v)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-6, atol=1e-5)
    assert torch.equal(got[1], ref[1])
    if not write_grad:
        assert torch.equal(got_chunk, logits)
        return
    # The kernel takes exp(x - lse), the reference exp(x - max) / sum: float32 rounding apart, which can flip a
    # bf16 or fp16 rounding, i.e. one unit in the last place of values below 1.
    if logits.dtype == torch.float32:
        torch.testing.assert_close(got_chunk, ref_chunk, rtol=2e-5, atol=1e-6)
    else:
        ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[logits.dtype]
        torch.testing.assert_close(got_chunk.float(), ref_chunk.float(), rtol=0, atol=ulp)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab, block_v", [(1000, 256), (512, 128), (100, None)])
def test_interpreted_kernel_matches_reference(dtype, vocab, block_v):
    logits, targets, valid = case(rows=5, vocab=vocab, dtype=dtype)
    assert_matches_reference(logits, targets, valid, 0.5, True, block_v)


@interpreted
def test_interpreted_kernel_without_valid_mask_on_large_logits():
    # Logits spread over +-100: the running max has to rescale the sum many times without overflowing.
    logits, targets, _ = case(rows=4, vocab=700, spread=40.0)
    assert_matches_reference(logits, targets, None, 1.0, True, block_v=64)


@interpreted
def test_interpreted_kernel_without_grad_leaves_the_logits():
    logits, targets, valid = case(rows=3, vocab=300, dtype=torch.bfloat16)
    assert_matches_reference(logits, targets, valid, 1.0, False, block_v=128)


@interpreted
def test_interpreted_kernel_reads_strided_rows():
    # A chunk that is the first rows of a wider buffer's columns: rows contiguous, row stride larger than V.
    wide, targets, valid = case(rows=4, vocab=640)
    logits = wide[:, :600]
    targets = targets.clamp(max=599)
    ref_chunk, got_chunk = wide.clone(), wide.clone()
    ref = softmax_grad_reference_(ref_chunk[:, :600], targets, valid, 1.0)
    got = softmax_grad_triton_(got_chunk[:, :600], targets, valid, 1.0, block_v=128)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got_chunk, ref_chunk, rtol=2e-5, atol=1e-6)
    assert torch.equal(got_chunk[:, 600:], wide[:, 600:])  # the columns beyond V are untouched
    assert logits.stride(0) == 640


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("vocab", [163840, 1000])
def test_kernel_matches_reference_on_cuda(vocab):
    logits, targets, valid = case(rows=64, vocab=vocab, dtype=torch.bfloat16, device="cuda")
    assert_matches_reference(logits, targets, valid, 0.5, True)
    assert_matches_reference(logits, targets, valid, 1.0, False)
