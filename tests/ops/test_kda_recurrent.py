"""fused_recurrent_kda (vectorised per-token decode) against the reference, against chunk_kda, and
prefill-then-decode against one chunked run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops import chunk_kda, fused_recurrent_kda, recurrent_kda_reference

F64 = torch.float64


def make_inputs(B, T, H, K, V, dtype=F64, decay=(0.0, 1.0), seed=0, num_states=None):
    """q, k, v, g, beta, h0; g uniform in -[decay] per step and channel."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    lo, hi = decay
    g = -(lo + (hi - lo) * torch.rand(B, T, H, K, generator=gen, dtype=F64))
    beta = torch.rand(B, T, H, generator=gen, dtype=F64)
    h0 = torch.randn(num_states or B, H, K, V, generator=gen, dtype=F64)
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0]


@pytest.mark.parametrize("use_l2norm", [False, True])
def test_matches_reference_with_gradients(use_l2norm):
    inputs = [x.requires_grad_() for x in make_inputs(2, 37, 2, 8, 6, seed=1)]
    q, k, v, g, beta, h0 = inputs
    results = []
    for fn in (fused_recurrent_kda, recurrent_kda_reference):
        o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                      use_qk_l2norm_in_kernel=use_l2norm)
        loss = (o * torch.linspace(-1, 1, o.numel(), dtype=F64).view_as(o)).sum() + final.square().sum()
        results.append([o, final, *torch.autograd.grad(loss, inputs)])
    for got, ref in zip(*results):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)


def test_packed_sequences_match_reference():
    lens = [3, 1, 0, 9, 5]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    q, k, v, g, beta, h0 = make_inputs(1, sum(lens), 2, 8, 8, seed=2, num_states=len(lens))
    o, final = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, final_ref = recurrent_kda_reference(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                           cu_seqlens=cu)
    torch.testing.assert_close(o, o_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(final, final_ref, atol=1e-12, rtol=0)


def test_chunk_equals_recurrent_float32():
    lens = [100, 1, 64, 29]
    cu = torch.tensor([0, *lens]).cumsum(0)
    q, k, v, g, beta, h0 = make_inputs(1, sum(lens), 2, 16, 8, dtype=torch.float32, decay=(0.0, 8.0), seed=3,
                                       num_states=len(lens))
    h0 = h0.float()
    args = dict(initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
    o_chunk, final_chunk = chunk_kda(q, k, v, g, beta, **args)
    o_rec, final_rec = fused_recurrent_kda(q, k, v, g, beta, **args)
    torch.testing.assert_close(o_chunk, o_rec, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(final_chunk, final_rec, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype, atol", [(F64, 1e-12), (torch.float32, 2e-5)])
def test_prefill_then_decode_equals_full_chunk_run(dtype, atol):
    """chunk_kda on a prefix, then fused_recurrent_kda one token at a time from its state == chunk_kda on all."""
    B, prefix, steps = 2, 70, 6
    q, k, v, g, beta, h0 = make_inputs(B, prefix + steps, 2, 8, 8, dtype=dtype, seed=4)
    h0 = h0.to(dtype)
    o_full, final_full = chunk_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True,
                                   use_qk_l2norm_in_kernel=True)
    head = [x[:, :prefix] for x in (q, k, v, g, beta)]
    o_prefix, state = chunk_kda(*head, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    outputs = [o_prefix]
    for t in range(prefix, prefix + steps):
        step = [x[:, t : t + 1] for x in (q, k, v, g, beta)]
        o_t, state = fused_recurrent_kda(*step, initial_state=state, output_final_state=True,
                                         use_qk_l2norm_in_kernel=True)
        outputs.append(o_t)
    torch.testing.assert_close(torch.cat(outputs, dim=1), o_full, atol=atol, rtol=0)
    torch.testing.assert_close(state, final_full, atol=atol, rtol=0)


def test_packed_decode_step_one_token_per_sequence():
    """A decode step for N sequences as one packed row (cu_seqlens = 0..N) equals the batched [N, 1] step."""
    N = 3
    q, k, v, g, beta, h0 = make_inputs(N, 1, 2, 8, 8, seed=5)
    o_batched, final_batched = fused_recurrent_kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)
    packed = [x.transpose(0, 1) for x in (q, k, v, g, beta)]  # [1, N, ...]
    o_packed, final_packed = fused_recurrent_kda(*packed, initial_state=h0, output_final_state=True,
                                                 cu_seqlens=torch.arange(N + 1))
    torch.testing.assert_close(o_packed.transpose(0, 1), o_batched, atol=0, rtol=0)
    torch.testing.assert_close(final_packed, final_batched, atol=0, rtol=0)


def test_bad_inputs_raise_clear_errors():
    q, k, v, g, beta, h0 = make_inputs(2, 4, 2, 8, 8)
    with pytest.raises(ValueError, match="fused_recurrent_kda: initial_state must be"):
        fused_recurrent_kda(q, k, v, g, beta, initial_state=h0[:1])
    with pytest.raises(ValueError, match="fused_recurrent_kda: packed sequences"):
        fused_recurrent_kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 8]))
