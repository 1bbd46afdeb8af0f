"""Reference KDA (``recurrent_kda_reference``; fla's ``naive_recurrent_kda``): the plain per-token recurrence, slow
and obviously correct, which every KDA path is tested against.

    S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T,    o_t = S_t^T (scale * q_t)

Shapes follow fla: q, k [B, T, H, K]; v [B, T, H, V]; g (log decay) [B, T, H, K]; beta [B, T, H];
states [N, H, K, V]. With ``cu_seqlens`` ([N+1], B must be 1) every packed sequence starts from its own initial
state (or zeros) and returns its own final state. Computes in float32, or float64 when given float64.
"""

from __future__ import annotations

import torch


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim: fla's and transformers' definition (eps inside the root)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def recurrent_kda_reference(
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
    """Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32/float64 or None)."""
    out_dtype = q.dtype
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, beta = (x.to(acc) for x in (q, k, v, g, beta))
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs batch size 1, got {B}")
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[i], cu[i + 1]) for i in range(len(cu) - 1)]
    o = torch.zeros(B, T, H, V, dtype=acc, device=q.device)
    finals = []
    for n, (b, start, end) in enumerate(bounds):
        S = q.new_zeros(H, K, V) if initial_state is None else initial_state[n].to(acc)
        for t in range(start, end):
            # Broadcast products rather than einsum: tiny BLAS calls are slow on a busy CPU.
            S = S * g[b, t].exp()[..., None]
            k_t = k[b, t][..., None]  # [H, K, 1]
            delta = beta[b, t][:, None] * (v[b, t] - (k_t * S).sum(-2))  # [H, V]
            S = S + k_t * delta[:, None, :]
            o[b, t] = ((q[b, t] * scale)[..., None] * S).sum(-2)
        finals.append(S)
    final = torch.stack(finals) if output_final_state else None
    return o.to(out_dtype), final
