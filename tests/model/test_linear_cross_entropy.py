"""linear_cross_entropy against plain cross-entropy over full logits: values and gradients, on the CPU (the fused
function with PyTorch's softmax gradient) and on a GPU (its Triton kernel, and cut-cross-entropy)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops.loss import LossRows, chunked_linear_cross_entropy, linear_cross_entropy


def case(dtype=torch.float32, rows=37, hidden=16, vocab=50, seed=0):
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(rows, hidden, generator=generator).to(dtype)
    w = (torch.randn(vocab, hidden, generator=generator) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::4] = -100
    return h, w, targets


def plain(h, w, targets, reduction):
    return F.cross_entropy((h @ w.T).float(), targets, ignore_index=-100, reduction=reduction)


def grads(loss_fn, h, w, train_weight=True):
    """(loss, grad of h, grad of w or None) of loss_fn(h, w) on fresh leaves."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(train_weight)
    loss = loss_fn(h, w)
    loss.backward()
    return loss.detach(), h.grad, w.grad


def model_like_case(device="cpu", rows=512, hidden=256, vocab=4000):
    """bf16 RMS-normed hidden states and a head scaled so that logits spread as a model's do; 1 in 7 ignored."""
    generator = torch.Generator().manual_seed(0)
    h = F.rms_norm(torch.randn(rows, hidden, generator=generator), (hidden,)).bfloat16()
    w = (torch.randn(vocab, hidden, generator=generator) * 0.08).bfloat16()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[::7] = -100
    return h.to(device), w.to(device), targets.to(device)


def assert_close_in_norm(got, expected, tol):
    """|got - expected| / |expected| < tol, over the whole tensor (bf16 rounding is relative to its scale)."""
    err = ((got.double() - expected.double()).norm() / expected.double().norm()).item()
    assert err < tol, err


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_value_and_gradients_match_full_logits(reduction, chunk_rows):
    h, w, targets = case()
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = chunked_linear_cross_entropy(h1, w1, targets, reduction, chunk_rows=chunk_rows)
    expected = plain(h2, w2, targets, reduction)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    got.backward(torch.tensor(1.7))
    expected.backward(torch.tensor(1.7))
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_each_rows_loss_with_its_own_weight_matches_full_logits(train_weight, chunk_rows):
    """reduction="none": each row's loss (0 on ignored rows), and the gradients of a sum that weighs every row
    differently, as a preference loss does."""
    h, w, targets = case()
    weights = torch.randn(targets.shape, generator=torch.Generator().manual_seed(3))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_(train_weight)
    got = chunked_linear_cross_entropy(h1, w1, targets, "none", chunk_rows=chunk_rows)
    expected = plain(h2, w2, targets, "none")
    assert got.dtype == torch.float32 and got.shape == targets.shape and (got[targets == -100] == 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    (got * weights).sum().backward()
    (expected * weights).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, targets, "none"), expected.detach())


def test_bf16_follows_transformers_precision():
    h, w, targets = case(torch.bfloat16)
    got = linear_cross_entropy(h, w, targets)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, plain(h, w, targets, "mean"), rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient():
    h, w, targets = case()
    h.requires_grad_()
    linear_cross_entropy(h, w, targets).backward()
    assert w.grad is None and h.grad is not None


def test_all_ignored_mean_is_nan_like_torch():
    h, w, targets = case()
    targets[:] = -100
    assert linear_cross_entropy(h, w, targets).isnan()
    assert linear_cross_entropy(h, w, targets, "sum").item() == 0.0


def test_trained_head_with_frozen_hidden_gets_only_its_gradient():
    h, w, targets = case()
    w.requires_grad_()
    linear_cross_entropy(h, w, targets).backward()
    expected = grads(lambda h, w: plain(h, w, targets, "mean"), h, w)[2]
    assert h.grad is None
    torch.testing.assert_close(w.grad, expected, rtol=1e-5, atol=1e-6)


def test_without_grad_only_the_loss_is_computed():
    h, w, targets = case()
    h.requires_grad_()
    with torch.no_grad():
        got = linear_cross_entropy(h, w, targets)
    assert got.grad_fn is None
    torch.testing.assert_close(got, plain(h, w, targets, "mean").detach(), rtol=1e-6, atol=1e-6)


def test_a_second_backward_gives_the_same_gradients():
    h, w, targets = case()
    h.requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, targets, chunk_rows=8)
    loss.backward(retain_graph=True)
    first = h.grad.clone()
    h.grad = None
    loss.backward(torch.tensor(2.0))
    torch.testing.assert_close(h.grad, 2 * first)


def test_all_ignored_sum_has_zero_gradients():
    h, w, targets = case()
    targets[:] = -100
    loss, grad_h, grad_w = grads(lambda h, w: linear_cross_entropy(h, w, targets, "sum"), h, w)
    assert loss.item() == 0.0 and not grad_h.any() and not grad_w.any()


def test_autocast_runs_the_head_in_bf16_and_returns_float32_gradients():
    h, w, targets = case(rows=64, hidden=32, vocab=300)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad_h, grad_w = grads(lambda h, w: linear_cross_entropy(h, w, targets), h, w)
    expected = grads(lambda h, w: plain(h.bfloat16(), w.bfloat16(), targets, "mean"), h, w)
    assert grad_h.dtype == grad_w.dtype == torch.float32
    torch.testing.assert_close(loss, expected[0], rtol=1e-5, atol=1e-5)
    assert_close_in_norm(grad_h, expected[1], 1e-2)
    assert_close_in_norm(grad_w, expected[2], 1e-2)


def test_bf16_gradients_are_within_bf16_rounding_of_float32():
    h, w, targets = model_like_case()
    got = grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, chunk_rows=100), h, w)
    expected = grads(lambda h, w: plain(h, w, targets, "mean"), h.float(), w.float())
    torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-4)
    assert got[1].dtype == got[2].dtype == torch.bfloat16
    assert_close_in_norm(got[1], expected[1], 1e-2)
    assert_close_in_norm(got[2], expected[2], 1e-2)


def test_bad_arguments_are_named():
    h, w, targets = case()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, targets[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="per-sequence")
    with pytest.raises(ValueError, match=r"\[N, H\] and \[V, H\]"):
        linear_cross_entropy(h, w[:, :3], targets)
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_cross_entropy(h, w, targets, impl="liger")
    with pytest.raises(ValueError, match="impl='cce' needs CUDA"):
        linear_cross_entropy(h, w, targets, impl="cce")


def test_fused_is_the_cpu_path():
    h, w, targets = case()
    assert torch.equal(linear_cross_entropy(h, w, targets, impl="fused"), linear_cross_entropy(h, w, targets))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cce_matches_fused_on_cuda():
    pytest.importorskip("cut_cross_entropy")
    h, w, targets = (t.cuda() for t in case(torch.bfloat16, rows=300, hidden=64, vocab=1000))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    got = linear_cross_entropy(h1, w1, targets, impl="cce")
    expected = chunked_linear_cross_entropy(h2, w2, targets)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    got.backward()
    expected.backward()
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(w1.grad.float(), w2.grad.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("vocab, chunk_rows", [(4000, 100), (163840, None)])
def test_fused_kernel_on_cuda_matches_float32_full_logits(train_weight, vocab, chunk_rows):
    h, w, targets = model_like_case("cuda", rows=1000, hidden=256, vocab=vocab)
    got = grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, chunk_rows=chunk_rows), h, w, train_weight)
    expected = grads(lambda h, w: plain(h, w, targets, "mean"), h.float(), w.float(), train_weight)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-3, atol=1e-3)
    assert got[1].dtype == torch.bfloat16
    assert_close_in_norm(got[1], expected[1], 1e-2)
    if train_weight:
        assert got[2].dtype == torch.bfloat16
        assert_close_in_norm(got[2], expected[2], 1e-2)
    else:
        assert got[2] is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fused_impl_on_cuda_without_grad():
    h, w, targets = model_like_case("cuda")
    with torch.no_grad():
        got = linear_cross_entropy(h, w, targets, impl="fused")
    torch.testing.assert_close(got, plain(h.float(), w.float(), targets, "mean"), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_loss_rows_made_early_give_the_same_rows_and_loss(device):
    h, w, targets = (t.to(device) for t in case(rows=300))
    rows = LossRows(targets)
    h = h * 2  # work queued after the rows were asked for
    assert torch.equal(rows.indices(), (targets != -100).nonzero().squeeze(1))
    assert rows.indices().device == targets.device
    got = grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets, loss_rows=rows), h, w)
    expected = grads(lambda h, w: chunked_linear_cross_entropy(h, w, targets), h, w)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
