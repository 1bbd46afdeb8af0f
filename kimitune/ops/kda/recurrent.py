"""Token-by-token KDA in PyTorch, vectorised over sequences and heads: ``fused_recurrent_kda_reference``, the decode
path off CUDA and under ``kimitune.ops.force_reference``.

Same recurrence as naive.py, but each step updates every running sequence and head at once: the schedule of
layout.py with chunks of one token, so packed sequences of different lengths (cu_seqlens) step together and a
decode step (T = 1 per sequence) is a single update. Differentiable through autograd (no in-place state updates).
"""

from __future__ import annotations

import torch

from kimitune.ops.kda.checks import check_kda_inputs
from kimitune.ops.kda.layout import ChunkLayout
from kimitune.ops.kda.naive import l2norm


def fused_recurrent_kda_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA one token at a time. Arguments and results as ``kimitune.ops.fused_recurrent_kda``.

    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; initial_state [N, H, K, V]; cu_seqlens [N+1] (B = 1).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32 (float64 for float64 inputs) or None).
    """
    N = check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, "fused_recurrent_kda")
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else float(scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    layout = ChunkLayout.build(B, T, H, 1, cu_seqlens, q.device)
    # Token-major tensors [tokens * H, 1, D], in the order the steps visit them.
    q_t, k_t = layout.gather(q, acc), layout.gather(k, acc)
    if use_qk_l2norm_in_kernel:
        q_t, k_t = l2norm(q_t), l2norm(k_t)
    q_t = q_t * scale
    v_t, beta_t = layout.gather(v, acc), layout.gather(beta, acc)[..., None]
    decay_t = layout.gather(g, acc).exp().transpose(1, 2)  # [tokens * H, K, 1]

    S = q.new_zeros(N * H, K, V, dtype=acc) if initial_state is None else layout.to_ranked(initial_state)
    S = S.to(acc).reshape(N * H, K, V)
    outputs = []
    for first, active in layout.steps:
        rows, running = slice(first * H, (first + active) * H), active * H
        S_run = S[:running] * decay_t[rows]
        k_row = k_t[rows]
        delta = beta_t[rows] * (v_t[rows] - torch.bmm(k_row, S_run))  # [running, 1, V]
        S_run = torch.baddbmm(S_run, k_row.transpose(1, 2), delta)
        outputs.append(torch.bmm(q_t[rows], S_run))
        S = S_run if running == S.shape[0] else torch.cat([S_run, S[running:]])
    o = torch.cat(outputs) if outputs else v.new_zeros(0, 1, V, dtype=acc)
    final = layout.from_ranked(S.view(N, H, K, V)) if output_final_state else None
    return layout.scatter(o, v.shape, q.dtype), final
