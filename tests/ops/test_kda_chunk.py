"""chunk_kda (PyTorch chunkwise, hand-written backward) against the per-token recurrence in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops import chunk_kda, recurrent_kda_reference
from kimitune.ops.kda.chunk import chunk_kda_reference

F64 = torch.float64


def make_inputs(B, T, H, K, V, dtype=F64, decay=(0.0, 1.0), seed=0, num_states=None):
    """q, k, v, g, beta, h0 as leaves; g uniform in -[decay] per step and channel."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    lo, hi = decay
    g = -(lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen, dtype=F64))
    beta = torch.rand(B, T, H, generator=gen, dtype=F64)
    h0 = torch.randn(num_states or B, H, K, V, generator=gen, dtype=F64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v, g, beta)] + [h0.requires_grad_()]


def run_with_grads(fn, inputs, cu_seqlens=None, use_l2norm=False, seed=1):
    """o, final state, and the gradients of a random linear function of both w.r.t. every input."""
    q, k, v, g, beta, h0 = inputs
    o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                  use_qk_l2norm_in_kernel=use_l2norm, cu_seqlens=cu_seqlens)
    gen = torch.Generator().manual_seed(seed)
    loss = (o.double() * torch.randn(o.shape, generator=gen, dtype=F64)).sum()
    loss = loss + (final.double() * torch.randn(final.shape, generator=gen, dtype=F64)).sum()
    return o, final, torch.autograd.grad(loss, inputs)


def assert_matches_reference(inputs, cu_seqlens=None, use_l2norm=False, atol=1e-10):
    o, final, grads = run_with_grads(chunk_kda, inputs, cu_seqlens, use_l2norm)
    o_ref, final_ref, grads_ref = run_with_grads(recurrent_kda_reference, inputs, cu_seqlens, use_l2norm)
    torch.testing.assert_close(o, o_ref, atol=atol, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=atol, rtol=0)
    for name, grad, ref in zip(["q", "k", "v", "g", "beta", "initial_state"], grads, grads_ref):
        torch.testing.assert_close(grad, ref, atol=atol, rtol=0, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize(
    "B, T, H, K, V",
    [(1, 64, 1, 8, 8), (2, 100, 2, 16, 8), (1, 130, 2, 8, 12), (1, 1, 1, 4, 4), (3, 7, 1, 4, 6)],
)
def test_matches_recurrence(B, T, H, K, V):
    assert_matches_reference(make_inputs(B, T, H, K, V))


def test_l2norm_in_kernel_and_its_gradient():
    inputs = make_inputs(2, 90, 2, 8, 8, seed=3)
    with torch.no_grad():
        inputs[0].mul_(3.0)  # q and k far from unit norm, so the normalisation matters
        inputs[1].mul_(0.2)
    assert_matches_reference(inputs, use_l2norm=True)


@pytest.mark.parametrize("decay", [(7.0, 8.0), (0.0, 8.0)])
def test_strong_decay_float64(decay):
    """Log decays down to -8 per step over whole chunks: would overflow exp(-G) (e^512) if ever formed."""
    assert_matches_reference(make_inputs(1, 200, 2, 8, 8, decay=decay, seed=4))


def test_strong_decay_float32_finite_and_accurate():
    inputs64 = make_inputs(1, 150, 2, 16, 16, decay=(0.0, 8.0), seed=5)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    o, final, grads = run_with_grads(chunk_kda, inputs32)
    o_ref, final_ref, grads_ref = run_with_grads(recurrent_kda_reference, inputs64)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    for got, ref in zip([o, final, *grads], [o_ref, final_ref, *grads_ref]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), ref, atol=2e-4, rtol=1e-4)


def test_zero_decay_and_zero_beta_edge_values():
    inputs = make_inputs(1, 70, 1, 8, 8, seed=6)
    with torch.no_grad():
        inputs[3][:, :35] = 0.0  # no decay at all
        inputs[4][:, 10:20] = 0.0  # no write
    assert_matches_reference(inputs)


def test_packed_sequences_match_recurrence_and_separate_runs():
    lens = [1, 70, 64, 0, 130, 5, 63]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    inputs = make_inputs(1, sum(lens), 2, 8, 6, decay=(0.0, 3.0), seed=7, num_states=len(lens))
    assert_matches_reference(inputs, cu_seqlens=cu)

    q, k, v, g, beta, h0 = (x.detach() for x in inputs)
    o, final = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu.long())
    for n, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        o_n, final_n = chunk_kda(*(x[:, start:end] for x in (q, k, v, g, beta)),
                                 initial_state=h0[n : n + 1], output_final_state=True)
        torch.testing.assert_close(o[:, start:end], o_n, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[n : n + 1], final_n, atol=1e-12, rtol=0)
    torch.testing.assert_close(final[3], h0[3])  # an empty sequence keeps its state


def test_without_initial_state_or_final_state():
    q, k, v, g, beta, _ = make_inputs(2, 80, 2, 8, 8, seed=8)
    o, final = chunk_kda(q, k, v, g, beta)
    o_ref, _ = recurrent_kda_reference(q, k, v, g, beta)
    assert final is None
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    (o * o).sum().backward()  # gradients flow without the state arguments
    assert q.grad is not None and torch.isfinite(g.grad).all()


def test_gradient_through_the_final_state_alone():
    inputs = make_inputs(1, 75, 2, 8, 8, seed=12)
    grads = []
    for fn in (chunk_kda, recurrent_kda_reference):
        _, final = fn(*inputs[:5], initial_state=inputs[5], output_final_state=True)
        grads.append(torch.autograd.grad(final.square().sum(), inputs, materialize_grads=True))
    for got, ref in zip(*grads):
        torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)


def test_custom_scale():
    q, k, v, g, beta, h0 = make_inputs(1, 40, 1, 8, 8, seed=9)
    o, _ = chunk_kda(q, k, v, g, beta, scale=0.3, initial_state=h0)
    o_ref, _ = recurrent_kda_reference(q, k, v, g, beta, scale=0.3, initial_state=h0)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = make_inputs(1, 100, 2, 16, 16, dtype=torch.bfloat16, decay=(0.0, 2.0), seed=10)
    q, k, v, g, beta, h0 = inputs
    h0_32 = h0.detach().float().requires_grad_()
    o, final, grads = run_with_grads(chunk_kda, [q, k, v, g, beta, h0_32], use_l2norm=True)
    assert o.dtype == torch.bfloat16 and final.dtype == torch.float32
    assert [x.dtype for x in grads] == [torch.bfloat16] * 5 + [torch.float32]
    # Reference: the same (bf16-rounded) inputs in float64.
    inputs64 = [x.detach().double().requires_grad_() for x in inputs]
    o_ref, final_ref, grads_ref = run_with_grads(recurrent_kda_reference, inputs64, use_l2norm=True)
    torch.testing.assert_close(o.double(), o_ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(final.double(), final_ref, atol=1e-4, rtol=1e-4)  # float32 accumulation
    for got, ref in zip(grads, grads_ref):
        torch.testing.assert_close(got.double(), ref, atol=5e-2, rtol=3e-2)


def test_float32_matches_float64_reference():
    inputs64 = make_inputs(1, 130, 2, 32, 16, decay=(0.0, 1.0), seed=11)
    inputs32 = [x.detach().float().requires_grad_() for x in inputs64]
    o, final, grads = run_with_grads(chunk_kda, inputs32, use_l2norm=True)
    o_ref, final_ref, grads_ref = run_with_grads(recurrent_kda_reference, inputs64, use_l2norm=True)
    for got, ref in zip([o, final, *grads], [o_ref, final_ref, *grads_ref]):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_dispatches_to_pytorch_on_cpu():
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(1, 20, 1, 4, 4))
    o, final = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    o_torch, final_torch = chunk_kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    assert torch.equal(o, o_torch) and torch.equal(final, final_torch)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x: {**x, "k": x["k"][..., :4]}, "k must have q's shape"),
        (lambda x: {**x, "v": x["v"][:, :, :1]}, "v must be"),
        (lambda x: {**x, "beta": x["beta"][..., None]}, "beta must be"),
        (lambda x: {**x, "q": x["q"][0]}, "q must be"),
        (lambda x: {**x, "initial_state": x["initial_state"][:, :, :2]}, "initial_state must be"),
        (lambda x: {**x, "cu_seqlens": torch.tensor([0, 10, 30])}, "batch size 1"),
        (lambda x: {**x, "q": x["q"][:1], "k": x["k"][:1], "v": x["v"][:1], "g": x["g"][:1],
                    "beta": x["beta"][:1], "initial_state": None, "cu_seqlens": torch.tensor([0, 10, 25])},
         "end at the sequence length 30"),
        (lambda x: {**x, "q": x["q"][:1], "k": x["k"][:1], "v": x["v"][:1], "g": x["g"][:1],
                    "beta": x["beta"][:1], "initial_state": None, "cu_seqlens": torch.tensor([0, 20, 10, 30])},
         "non-decreasing"),
        (lambda x: {**x, "q": x["q"][:1], "k": x["k"][:1], "v": x["v"][:1], "g": x["g"][:1],
                    "beta": x["beta"][:1], "initial_state": None, "cu_seqlens": torch.tensor([0.0, 30.0])},
         "int32 or int64"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    q, k, v, g, beta, h0 = (x.detach() for x in make_inputs(2, 30, 2, 8, 8))
    args = change({"q": q, "k": k, "v": v, "g": g, "beta": beta, "initial_state": h0, "cu_seqlens": None})
    with pytest.raises(ValueError, match=message):
        chunk_kda(**args)


def test_gate_parameters_give_the_decay_of_kda_decay():
    """chunk_kda(f, A_log=, dt_bias=) is chunk_kda(kda_decay(f, A_log, dt_bias)), gradients to f, A_log and dt_bias
    included (the CPU path computes the decay first; fla computes it in its kernel)."""
    from kimitune.ops import kda_decay

    q, k, v, _, beta, h0 = make_inputs(1, 70, 2, 8, 8)
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(1, 70, 2, 8, generator=gen, dtype=F64, requires_grad=True)
    A_log = torch.rand(2, generator=gen, dtype=F64).add(1).log().requires_grad_()
    dt_bias = torch.randn(16, generator=gen, dtype=F64, requires_grad=True)
    direct = chunk_kda(q, k, v, f, beta, initial_state=h0, A_log=A_log, dt_bias=dt_bias)[0]
    via_decay = chunk_kda(q, k, v, kda_decay(f, A_log, dt_bias), beta, initial_state=h0)[0]
    torch.testing.assert_close(direct, via_decay, rtol=0, atol=0)
    direct.sum().backward()
    grads = [t.grad.clone() for t in (f, A_log, dt_bias)]
    for t in (f, A_log, dt_bias):
        t.grad = None
    via_decay.sum().backward()
    for got, expected in zip(grads, (f.grad, A_log.grad, dt_bias.grad)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected_g = -A_log.detach().exp()[:, None] * F.softplus(f.detach() + dt_bias.detach().view(2, 8))
    torch.testing.assert_close(kda_decay(f, A_log, dt_bias), expected_g.float())
