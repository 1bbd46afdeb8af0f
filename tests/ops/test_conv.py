"""Causal depthwise short conv: against a per-sequence reference, packed == separate, decode update == full
conv, float64 gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops import causal_conv1d, causal_conv1d_update

F64 = torch.float64


def reference_conv(x, weight, bias, activation, initial_state):
    """One sequence x [L, D] with history [D, W] (the W inputs before it, oldest first): plain sum over taps."""
    L, D = x.shape
    W = weight.shape[1]
    history = torch.zeros(D, W, dtype=x.dtype) if initial_state is None else initial_state
    full = torch.cat([history.t(), x])  # [W + L, D]
    y = torch.stack([(full[t + 1 : t + 1 + W].t() * weight).sum(-1) for t in range(L)]) if L else x.clone()
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y, full[-W:].t()


def random_case(T, D, W, N, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, T, D, generator=gen, dtype=dtype)
    weight = torch.randn(D, W, generator=gen, dtype=dtype)
    bias = torch.randn(D, generator=gen, dtype=dtype)
    h0 = torch.randn(N, D, W, generator=gen, dtype=dtype)
    return x, weight, bias, h0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_packed_matches_per_sequence_reference(with_state, activation):
    lens = [1, 2, 0, 9, 3, 17]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    x, weight, bias, h0 = random_case(sum(lens), 5, 4, len(lens), seed=1)
    h0 = h0 if with_state else None
    y, final = causal_conv1d(x, weight, bias, activation, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_ref, final_ref = reference_conv(x[0, s:e], weight, bias, activation, None if h0 is None else h0[n])
        torch.testing.assert_close(y[0, s:e], y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[n], final_ref, atol=1e-12, rtol=0)


def test_packed_equals_separate_calls():
    lens = [6, 1, 11]
    cu = torch.tensor([0, *lens]).cumsum(0)
    x, weight, bias, h0 = random_case(sum(lens), 8, 3, len(lens), seed=2)
    y, final = causal_conv1d(x, weight, bias, "silu", initial_state=h0, output_final_state=True, cu_seqlens=cu)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        y_n, final_n = causal_conv1d(x[:, s:e], weight, bias, "silu", initial_state=h0[n : n + 1],
                                     output_final_state=True)
        torch.testing.assert_close(y[:, s:e], y_n, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[n : n + 1], final_n, atol=1e-12, rtol=0)


def test_batch_rows_are_separate_sequences():
    x, weight, bias, h0 = random_case(2 * 7, 4, 4, 2, seed=3)
    x = x.view(2, 7, 4)
    y, final = causal_conv1d(x, weight, None, None, initial_state=h0, output_final_state=True)
    for b in range(2):
        y_ref, final_ref = reference_conv(x[b], weight, None, None, h0[b])
        torch.testing.assert_close(y[b], y_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(final[b], final_ref, atol=1e-12, rtol=0)


def test_update_steps_equal_the_full_conv():
    """Prefill with causal_conv1d, then decode token by token with causal_conv1d_update (state rolled in place)."""
    x, weight, bias, h0 = random_case(2 * 12, 6, 4, 2, seed=4)
    x = x.view(2, 12, 6)
    y_full, final_full = causal_conv1d(x, weight, bias, "silu", initial_state=h0, output_final_state=True)
    y_prefix, state = causal_conv1d(x[:, :5], weight, bias, "silu", initial_state=h0, output_final_state=True)
    steps = []
    for t in range(5, 12):
        y_t, returned = causal_conv1d_update(x[:, t], state, weight, bias, "silu")
        assert returned is state  # updated in place, as fla does
        steps.append(y_t)
    torch.testing.assert_close(torch.cat([y_prefix, torch.stack(steps, 1)], 1), y_full, atol=1e-12, rtol=0)
    torch.testing.assert_close(state, final_full, atol=1e-12, rtol=0)


def test_bfloat16_update_keeps_dtypes():
    x, weight, bias, h0 = random_case(3, 4, 4, 3, seed=5, dtype=torch.bfloat16)
    y, state = causal_conv1d_update(x[0], h0.clone(), weight, bias, "silu")
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    ref, _ = reference_conv(x[0, :1].double(), weight.double(), bias.double(), "silu", h0[0].double())
    torch.testing.assert_close(y[0].double(), ref[0], atol=2e-2, rtol=2e-2)


def test_gradcheck_packed_with_state():
    lens = [2, 5, 1]
    cu = torch.tensor([0, *lens]).cumsum(0)
    x, weight, bias, h0 = (t.requires_grad_() for t in random_case(sum(lens), 3, 3, len(lens), seed=6))

    def fn(x, weight, bias, h0):
        return causal_conv1d(x, weight, bias, "silu", initial_state=h0, output_final_state=True, cu_seqlens=cu)

    assert torch.autograd.gradcheck(fn, (x, weight, bias, h0), fast_mode=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(weight=torch.zeros(5, 4)), "weight must be"),
        (dict(bias=torch.zeros(3)), "bias must be"),
        (dict(activation="relu"), "unsupported activation"),
        (dict(initial_state=torch.zeros(2, 4, 4)), "conv state must be"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9])), "end at the sequence length 10"),
    ],
)
def test_bad_inputs_raise_clear_errors(kwargs, message):
    args = dict(x=torch.zeros(1, 10, 4), weight=torch.zeros(4, 4), bias=None, activation=None,
                initial_state=None, output_final_state=False, cu_seqlens=None)
    with pytest.raises(ValueError, match=message):
        causal_conv1d(**{**args, **kwargs})
    with pytest.raises(ValueError, match="causal_conv1d_update: conv state must be"):
        causal_conv1d_update(torch.zeros(2, 4), torch.zeros(3, 4, 4), torch.zeros(4, 4))


def test_output_in_parts_matches_the_whole_and_refuses_an_uneven_split():
    x, weight = torch.randn(1, 9, 12), torch.randn(12, 4)
    whole, _ = causal_conv1d(x, weight, activation="silu")
    parts, _ = causal_conv1d(x, weight, activation="silu", parts=3)
    assert len(parts) == 3 and torch.equal(torch.cat(parts, dim=-1), whole)
    with pytest.raises(ValueError, match="causal_conv1d: 12 channels do not split into 5 parts"):
        causal_conv1d(x, weight, activation="silu", parts=5)
