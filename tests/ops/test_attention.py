"""kimitune.ops.attention: packed causal attention equals attention over each sequence alone; on a GPU the
varlen flash path equals the masked reference (values and gradients, MLA's 192/128 head sizes); attention of the
last T of S tokens equals the masked reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kimitune.ops.attention import (
    causal_attention,
    packed_causal_attention,
    packed_causal_attention_reference,
    packed_causal_mask,
)


def test_mask_is_block_diagonal_and_causal():
    mask = packed_causal_mask(torch.tensor([0, 2, 5]), 5)
    expected = torch.tensor([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)


def _inputs(device, dtype, lengths=(5, 17, 1, 40), heads=3, qk=24, v=16, seed=0):
    gen = torch.Generator(device).manual_seed(seed)
    total = sum(lengths)
    q, k = (torch.randn(1, heads, total, qk, device=device, generator=gen).to(dtype) for _ in range(2))
    value = torch.randn(1, heads, total, v, device=device, generator=gen).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, value, cu


def test_packed_attention_equals_each_sequence_alone():
    q, k, v, cu = _inputs("cpu", torch.float64)
    out = packed_causal_attention(q, k, v, cu, 0.2)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, start:end], v[:, :, start:end],
                                               is_causal=True, scale=0.2)
        torch.testing.assert_close(out[:, :, start:end], alone)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_varlen_flash_matches_the_masked_reference_on_gpu():
    q, k, v, cu = _inputs("cuda", torch.bfloat16, lengths=(300, 1, 1000, 748), heads=4, qk=192, v=128)
    grads = []
    for fn in (packed_causal_attention, packed_causal_attention_reference):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*leaves, cu, 192**-0.5)
        out.float().pow(2).sum().backward()
        grads.append([out.detach()] + [t.grad for t in leaves])
    for got, ref in zip(*grads):
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-2, err


@pytest.mark.parametrize("T, S", [(9, 9), (4, 13), (1, 7)], ids=["prefill", "piece-after-cache", "one-token"])
def test_causal_attention_of_the_last_tokens_equals_the_masked_reference(T, S):
    # MLA's shapes: keys wider than values, so on the CPU v goes through zero padding into the flash kernel.
    torch.manual_seed(T * S)
    q, k, v = torch.randn(2, 3, T, 24), torch.randn(2, 3, S, 24), torch.randn(2, 3, S, 16)
    mask = torch.arange(S)[None, :] <= torch.arange(S - T, S)[:, None]  # query t sees keys 0 .. S - T + t
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = causal_attention(q, k, v, 0.3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
