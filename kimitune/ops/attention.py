"""Causal softmax attention: over packed sequences (flash attention's varlen kernel on CUDA, a mask elsewhere), and
over the last T of S tokens (a prefill piece or a chat turn after cached tokens).

    packed_causal_attention(q [1, H, T, Dqk], k [1, H, T, Dqk], v [1, H, T, Dv], cu_seqlens [N+1], scale)
        -> [1, H, T, Dv]
    causal_attention(q [B, H, T, Dqk], k [B, H, S, Dqk], v [B, H, S, Dv], scale) -> [B, H, T, Dv]
        the last T of S tokens of each row (T == S: plain causal attention)

Query t attends key s when both lie in the same packed sequence and s <= t. The PyTorch path builds that
[T, T] block-diagonal causal mask (memory and time grow with T^2 whatever the sequence lengths); on CUDA with
bf16/fp16 inputs ``torch.nn.attention.varlen.varlen_attn`` runs flash attention per sequence from ``cu_seqlens``
instead: no mask, work proportional to the sum of squared lengths. Flash attention needs one head size for q, k
and v; MLA's values are narrower than its keys (128 against 192), so v is zero-padded to the key width and the
padding is cut from the output (zero columns of v give zero output columns, and their gradient is dropped).
Pass ``cu_seqlens`` on the host (as the KDA ops take it) so the longest length is read without a device sync.
:func:`packed_causal_attention_reference` is the masked path; ``kimitune.ops.force_reference`` sends CUDA tensors
there too.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.reference_switch import use_kernels


def packed_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total, total] bool, True where query t may attend key s: same packed sequence and s <= t (no host sync)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    sequence = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    same = sequence[:, None] == sequence[None, :]
    return same & (positions[None, :] <= positions[:, None])


@functools.cache
def _varlen_attn():
    """torch's varlen flash attention and how it asks for causality (the keyword changed between releases)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    parameters = inspect.signature(varlen_attn).parameters
    if "window_size" in parameters:
        return functools.partial(varlen_attn, window_size=(-1, 0))
    if "is_causal" in parameters:
        return functools.partial(varlen_attn, is_causal=True)
    return None


def packed_causal_attention_reference(q, k, v, cu_seqlens: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: scaled_dot_product_attention with the block-diagonal causal mask."""
    mask = packed_causal_mask(cu_seqlens.to(q.device), q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def packed_causal_attention(q, k, v, cu_seqlens: BatchLayout | torch.Tensor, scale: float) -> torch.Tensor:
    """q, k [1, H, T, Dqk], v [1, H, T, Dv] -> [1, H, T, Dv] with the batch's layout (or its bounds); see the module
    docstring."""
    layout = BatchLayout.of(cu_seqlens, q.device, q.shape[2])
    varlen = _varlen_attn()
    if varlen is None or not use_kernels(q) or q.dtype not in (torch.bfloat16, torch.float16):
        return packed_causal_attention_reference(q, k, v, layout.cu_seqlens, scale)
    longest = layout.max_seqlen
    cu = layout.cu_seqlens.to(torch.int32)
    v_dim, qk_dim = v.shape[-1], q.shape[-1]
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))  # [T, H, D]
    if v_dim < qk_dim:
        v = F.pad(v, (0, qk_dim - v_dim))
    out = varlen(q, k, v, cu, cu, longest, longest, scale=scale)
    return out[..., :v_dim].transpose(0, 1).unsqueeze(0)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal sdpa of the last T of S tokens: q [B, H, T, Dqk], k [B, H, S, Dqk], v [B, H, S, Dv] -> [B, H, T, Dv];
    query t sees keys 0 .. S - T + t (``causal_lower_right``: no [T, S] mask is built).

    On the CPU v is zero-padded to Dqk and the padding cut from the output: the CPU's flash kernel needs one head
    size, and without it sdpa falls back to its math path, which holds [B, H, T, S] scores (several times slower,
    and gigabytes of scores at long prompts: benchmarks/RESULTS.md). Both paths are sdpa, which picks its own
    kernel, so ``kimitune.ops.force_reference`` leaves this op as it is."""
    T, S = q.shape[-2], k.shape[-2]
    causal = {"is_causal": True} if T == S else {"attn_mask": causal_lower_right(T, S)}
    if q.is_cuda or v.shape[-1] >= q.shape[-1]:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **causal)
    padded = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    return F.scaled_dot_product_attention(q, k, padded, scale=scale, **causal)[..., : v.shape[-1]]
