"""Chunkwise KDA in PyTorch (WY form, chunks of 64) with a hand-written backward: ``chunk_kda_reference``, the
training path off CUDA and under ``kimitune.ops.force_reference``.

Per chunk of C tokens entering with state S [K, V] (q already scaled, G the in-chunk cumulative log decay,
Gamma = exp(G), gl = G at the chunk's last row; all exponents below are <= 0):

    A_qk = scores(q, k) (t >= j),  L = diag(beta) scores(k, k) (t > j)          (see decay.py)
    T = (I + L)^-1,   w = T (beta k Gamma),   u0 = T (beta v)
    U = u0 - w S                                     (the delta-rule corrections, [C, V])
    o = (q Gamma) S + A_qk U
    S' = exp(gl) * S + (k exp(gl - G))^T U

Everything but ``U = u0 - w S`` and ``S'`` is batched over all chunks; the recurrence is one loop over chunk
steps (see layout.py), batched over sequences and heads. The backward recomputes the elementwise factors and the
decay products from the inputs and stores only T, A_qk, scores(k, k) and the chunk-entry states.
Accumulates in float32 (float64 for float64 inputs); returns o in q's dtype.
"""

from __future__ import annotations

import torch

from kimitune.ops.kda.blocks import unit_lower_inverse
from kimitune.ops.kda.checks import check_kda_inputs
from kimitune.ops.kda.decay import ChunkDecay
from kimitune.ops.kda.layout import ChunkLayout
from kimitune.ops.kda.naive import l2norm

CHUNK_SIZE = 64


def _l2norm_backward(x: torch.Tensor, dy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gradient of ``l2norm`` at x: r (dy - y (y . dy)) with r = (|x|^2 + eps)^-1/2, y = x r."""
    r = torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)
    y = x * r
    return r * (dy - y * (y * dy).sum(-1, keepdim=True))


def _reverse_cumsum(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.flip(dim).cumsum(dim).flip(dim)


class _Chunks:
    """The recomputable per-chunk tensors of one call, all [NC*H, C, *] in the accumulation dtype."""

    def __init__(self, q, k, v, g, beta, scale, use_l2norm, layout: ChunkLayout, acc: torch.dtype):
        self.q_raw, self.k_raw = layout.gather(q, acc), layout.gather(k, acc)
        if use_l2norm:
            self.qk = torch.stack([l2norm(self.q_raw), l2norm(self.k_raw)])
        else:
            self.qk = torch.stack([self.q_raw, self.k_raw])
        self.qk[0].mul_(scale)
        self.q, self.k = self.qk[0], self.qk[1]  # [2, NC*H, C, K]: products sharing k run stacked
        self.v, self.beta = layout.gather(v, acc), layout.gather(beta, acc)[..., None]
        G = layout.gather(g, acc).cumsum_(1)
        self.decay = ChunkDecay(G)
        self.gamma = G.exp()
        self.G_last = G[:, -1:]
        self.to_end = (self.G_last - G).exp_()  # decay from each row to the chunk's end
        self.gamma_last = self.G_last.exp()  # decay over the whole chunk, [NC*H, 1, K]
        self.k_gamma = self.k * self.gamma
        self.k_to_end = self.k * self.to_end

    def solve(self, A_kk: torch.Tensor) -> torch.Tensor:
        """T = (I + diag(beta) A_kk)^-1 for strictly lower A_kk [NC*H, C, C]."""
        return unit_lower_inverse(A_kk * self.beta)

    def transition(self, w: torch.Tensor) -> torch.Tensor:
        """A = diag(exp(gl)) - (k exp(gl - G))^T w [NC*H, K, K]: S' = A S + (k exp(gl - G))^T u0."""
        A = torch.matmul(self.k_to_end.transpose(1, 2), w).neg_()
        A.diagonal(dim1=1, dim2=2).add_(self.gamma_last[:, 0])
        return A

    def wy(self, T_inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w = T (beta k Gamma) [NC*H, C, K] and u0 = T (beta v) [NC*H, C, V]."""
        return torch.matmul(T_inv, self.k_gamma * self.beta), torch.matmul(T_inv, self.v * self.beta)


def _state_steps(layout: ChunkLayout):
    """(rows of the chunk tensors, rows of the ranked state tensor) for each recurrence step."""
    H = layout.num_heads
    for first, active in layout.steps:
        yield slice(first * H, (first + active) * H), slice(0, active * H)


class ChunkKDAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, scale: float, use_l2norm: bool, layout: ChunkLayout):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        H, K, V = q.shape[2], q.shape[3], v.shape[3]
        N = layout.num_seqs
        ch = _Chunks(q, k, v, g, beta, scale, use_l2norm, layout, acc)

        scores = ch.decay.scores(ch.qk, ch.k)  # [2, NC*H, C, C]: strictly lower A_qk, A_kk
        A_qk, A_kk = scores[0], scores[1]
        A_qk.diagonal(dim1=1, dim2=2).copy_((ch.q * ch.k).sum(-1))
        T_inv = ch.solve(A_kk)
        w, u0 = ch.wy(T_inv)

        # S' = A S + B per chunk; the loop is one matmul per step, batched over sequences and heads.
        transition = ch.transition(w)
        S = q.new_zeros(N * H, K, V, dtype=acc)
        if initial_state is not None:
            S.copy_(layout.to_ranked(initial_state).view(N * H, K, V))
        h = torch.empty(layout.num_chunks * H, K, V, dtype=acc, device=q.device)  # state entering each chunk
        inflow = torch.matmul(ch.k_to_end.transpose(1, 2), u0)  # B = (k exp(gl - G))^T u0, [NC*H, K, V]
        for rows, ranked in _state_steps(layout):
            h[rows] = S[ranked]
            torch.baddbmm(inflow[rows], transition[rows], h[rows], out=S[ranked])
        U = torch.baddbmm(u0, w, h, alpha=-1)
        o = torch.matmul(A_qk, U).baddbmm_(ch.q * ch.gamma, h)

        ctx.save_for_backward(q, k, v, g, beta, initial_state, T_inv, scores, h)
        ctx.scale, ctx.use_l2norm, ctx.layout = scale, use_l2norm, layout
        ctx.set_materialize_grads(False)
        final = layout.from_ranked(S.view(N, H, K, V))
        return layout.scatter(o, v.shape, q.dtype), final

    @staticmethod
    def backward(ctx, d_o, d_final):
        q, k, v, g, beta, initial_state, T_inv, scores, h = ctx.saved_tensors
        layout: ChunkLayout = ctx.layout
        acc = h.dtype
        H, K, V = q.shape[2], q.shape[3], v.shape[3]
        N = layout.num_seqs
        ch = _Chunks(q, k, v, g, beta, ctx.scale, ctx.use_l2norm, layout, acc)
        A_qk, A_kk = scores[0], scores[1]
        w, u0 = ch.wy(T_inv)
        U = torch.baddbmm(u0, w, h, alpha=-1)
        q_gamma = ch.q * ch.gamma
        do = layout.gather(d_o, acc) if d_o is not None else torch.zeros_like(U)

        # Reverse recurrence dS = A^T dS' + E, one matmul per step; dS is the gradient of the state leaving the
        # current step's chunks, dS_next keeps it per chunk.
        dS = q.new_zeros(N * H, K, V, dtype=acc)
        if d_final is not None:
            dS.copy_(layout.to_ranked(d_final).view(N * H, K, V))
        dU = torch.matmul(A_qk.transpose(1, 2), do)  # the part of dU that does not go through S'
        local = torch.matmul(q_gamma.transpose(1, 2), do).baddbmm_(w.transpose(1, 2), dU, alpha=-1)  # E
        transition_t = ch.transition(w).transpose(1, 2)
        dS_next = torch.empty_like(h)
        for rows, ranked in reversed(list(_state_steps(layout))):
            dS_next[rows] = dS[ranked]
            torch.baddbmm(local[rows], transition_t[rows], dS_next[rows], out=dS[ranked])
        del local, transition_t
        dU.baddbmm_(ch.k_to_end, dS_next)

        h_t = h.transpose(1, 2)
        dq_gamma = torch.matmul(do, h_t)
        d_scores = torch.empty_like(scores)  # d A_qk (lower), d A_kk (strictly lower)
        torch.matmul(do, U.transpose(1, 2), out=d_scores[0]).tril_()
        dk_to_end = torch.matmul(U, dS_next.transpose(1, 2))
        d_decay_last = (h * dS_next).sum(-1)[:, None, :]  # d gamma_last, [NC*H, 1, K]
        del U, dS_next
        dw = torch.matmul(dU, h_t).neg_()
        T_t = T_inv.transpose(1, 2)
        dkbg = torch.matmul(T_t, dw)  # d(beta k Gamma)
        dbv = torch.matmul(T_t, dU)  # d(beta v)
        dL = torch.matmul(dkbg, w.transpose(1, 2)).baddbmm_(dbv, u0.transpose(1, 2)).neg_().tril_(-1)
        torch.mul(dL, ch.beta, out=d_scores[1])
        dbeta = (dL * A_kk).sum(-1) + (ch.k_gamma * dkbg).sum(-1) + (ch.v * dbv).sum(-1)
        dv = dbv.mul_(ch.beta)

        # Through the decay-masked scores: the strict lower parts mix with decay, the diagonal of A_qk without.
        rows_qk, cols_k = ch.decay.mix(d_scores, ch.qk, ch.k)  # rows: for q (from A_qk) and k (from A_kk)
        diag_qk = d_scores[0].diagonal(dim1=1, dim2=2)[..., None]
        dG = ch.q * rows_qk[0] + ch.k * (rows_qk[1] - cols_k)
        dq = rows_qk[0].addcmul_(ch.gamma, dq_gamma).addcmul_(diag_qk, ch.k)
        dk = rows_qk[1].add_(cols_k).addcmul_(diag_qk, ch.q)
        dk.addcmul_(dkbg, ch.gamma * ch.beta).addcmul_(dk_to_end, ch.to_end)

        kbg_dkbg = dkbg.mul_(ch.k_gamma).mul_(ch.beta)
        end_term = dk_to_end.mul_(ch.k_to_end)
        dG.addcmul_(q_gamma, dq_gamma).add_(kbg_dkbg).sub_(end_term)
        dG[:, -1:] += end_term.sum(1, keepdim=True) + ch.gamma_last * d_decay_last
        dg = _reverse_cumsum(dG, 1)

        dq.mul_(ctx.scale)
        if ctx.use_l2norm:
            dq, dk = _l2norm_backward(ch.q_raw, dq), _l2norm_backward(ch.k_raw, dk)
        d_initial = None
        if initial_state is not None and ctx.needs_input_grad[5]:
            d_initial = layout.from_ranked(dS.view(N, H, K, V)).to(initial_state.dtype)
        return (
            layout.scatter(dq, q.shape, q.dtype),
            layout.scatter(dk, k.shape, k.dtype),
            layout.scatter(dv, v.shape, v.dtype),
            layout.scatter(dg, g.shape, g.dtype),
            layout.scatter(dbeta, beta.shape, beta.dtype),
            d_initial,
            None,
            None,
            None,
        )


def chunk_kda_reference(
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
    """KDA over whole sequences, chunkwise. Arguments and results as ``kimitune.ops.chunk_kda``.

    q, k, g [B, T, H, K]; v [B, T, H, V]; beta [B, T, H]; initial_state [N, H, K, V]; cu_seqlens [N+1] (B = 1).
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32 (float64 for float64 inputs) or None).
    """
    check_kda_inputs(q, k, v, g, beta, initial_state, cu_seqlens, "chunk_kda")
    B, T, H, K = q.shape
    scale = K**-0.5 if scale is None else float(scale)
    layout = ChunkLayout.build(B, T, H, CHUNK_SIZE, cu_seqlens, q.device)
    o, final = ChunkKDAFunction.apply(q, k, v, g, beta, initial_state, scale, use_qk_l2norm_in_kernel, layout)
    return o, (final if output_final_state else None)
