"""Kimi Delta Attention (KDA) layer: the linear-attention layers of Kimi Linear.

    q, k, v = SiLU(causal_conv(x W_q, x W_k, x W_v))           one depthwise short conv over the 3 * H * K channels
                                                               (x's six projections: model/projections.py)
    g       = -exp(A_log) * softplus(f_b(f_a(x)) + dt_bias)    per-channel log decay [B, T, H, K], float32
                                                               (inside fla's kernels on CUDA: ops/kda/gate.py)
    beta    = sigmoid(b_proj(x))                               [B, T, H]
    o       = KDA(l2norm(q), l2norm(k), v, g, beta)            kimitune.ops.chunk_kda, state [N, H, K, K]
    y       = o_proj(rmsnorm(o) * sigmoid(g_b(g_a(x))))        gated RMSNorm per head, float32

Shapes follow fla: x [B, T, C]; q, k, v [B, T, H, K]. With ``cu_seqlens`` (B == 1) the conv and the recurrence
restart at every sequence boundary. With a ``KDAState`` the layer continues from the given conv and recurrent
states and returns the ones at the end of its input (prefill, then decode: a single token with a state goes
through the decode kernels causal_conv1d_update and fused_recurrent_kda). With a ``cp_context`` (CUDA, context
parallelism: model/context_parallel.py) x is this rank's tokens [1, L, C] of a row, and fla's kernels pass the conv
and recurrent states between the ranks themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.projections import project_shared_input
from kimitune.model.norm import GatedRMSNorm
from kimitune.ops import BatchLayout, causal_conv1d, causal_conv1d_update, chunk_kda, fused_recurrent_kda, kda_decay


@dataclass
class KDAState:
    """What a KDA layer carries from one call to the next: conv [N, 3*H*K, W] and recurrent [N, H, K, K] (fp32)."""

    conv: torch.Tensor
    recurrent: torch.Tensor


class KDAForgetGate(nn.Module):
    """x [B, T, C] -> log decay g = -exp(A_log) * softplus(f_b_proj(f_a_proj(x)) + dt_bias), [B, T, H, K] float32."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, num_heads * head_dim, bias=False)
        self.A_log = nn.Parameter(torch.empty(1, 1, num_heads, 1))
        self.dt_bias = nn.Parameter(torch.empty(num_heads * head_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """fla's initialisation: A = U(1, 16); dt = exp(U(log 1e-3, log 1e-1)) and dt_bias = softplus^-1(dt)."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1, 16).log())
        dt = torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp().clamp_min(1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def gate_input(self, f_a: torch.Tensor) -> torch.Tensor:
        """f_a_proj(x) [B, T, K] -> f_b_proj(f_a_proj(x)) [B, T, H, K], in x's dtype: what ``kda_decay`` (or
        chunk_kda with ``A_log`` and ``dt_bias``) turns into the log decay. (The layer computes f_a_proj(x) with its
        other projections of x.)"""
        return self.f_b_proj(f_a).view(*f_a.shape[:2], self.num_heads, self.head_dim)

    def decay(self, f_a: torch.Tensor) -> torch.Tensor:
        """f_a_proj(x) [B, T, K] -> the log decay g [B, T, H, K], float32."""
        return kda_decay(self.gate_input(f_a), self.A_log.view(-1), self.dt_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decay(self.f_a_proj(x))


class KimiDeltaAttention(nn.Module):
    """x [B, T, C] -> [B, T, C]. Parameter names are transformers' KimiLinearDeltaAttention's."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        hidden, heads, head_dim = config.hidden_size, config.kda_num_heads, config.kda_head_dim
        self.num_heads, self.head_dim = heads, head_dim
        width = heads * head_dim
        self.q_proj = nn.Linear(hidden, width, bias=False)
        self.k_proj = nn.Linear(hidden, width, bias=False)
        self.v_proj = nn.Linear(hidden, width, bias=False)
        # weight [3 * H * K, 1, W]: the q, k and v channels' kernels, concatenated.
        self.conv1d = nn.Conv1d(3 * width, 3 * width, config.kda_short_conv_kernel_size, groups=3 * width, bias=False)
        self.forget_gate = KDAForgetGate(hidden, heads, head_dim)
        self.b_proj = nn.Linear(hidden, heads, bias=False)
        self.g_a_proj = nn.Linear(hidden, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, width, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=config.rms_norm_eps)
        self.o_proj = nn.Linear(width, hidden, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cu_seqlens: BatchLayout | torch.Tensor | None = None,
        state: KDAState | None = None,
        return_state: bool = False,
        keep_intermediates: bool = False,
        cp_context=None,
    ) -> tuple[torch.Tensor, KDAState | None]:
        """x [B, T, C] -> (y [B, T, C], the state after the input when ``return_state`` else None); the packed
        batch's layout (or bounds) in ``cu_seqlens``; ``keep_intermediates``: ``RunOptions.kda_keep_intermediates``.
        ``cp_context``: fla's ``FLACPContext`` (``kimitune.ops.context_parallel_context``) for x [1, L, C], this
        rank's tokens of a row split over a process group; its bounds stand for ``cu_seqlens`` (the same ones, this
        rank's), and it takes no ``state`` and no ``return_state`` (the states pass between the ranks inside fla)."""
        if cp_context is not None:
            if state is not None or return_state:
                raise ValueError("KimiDeltaAttention: with cp_context fla passes the states between the ranks: no "
                                 "state, no return_state")
            cu_seqlens = None  # the context's bounds are the rank's: the ops take them from it
        B, T, _ = x.shape
        heads_shape = (B, T, self.num_heads, self.head_dim)
        gate = self.forget_gate
        qkv, beta, f_a, g_a = project_shared_input(x, (self.q_proj, self.k_proj, self.v_proj), self.b_proj,
                                                   gate.f_a_proj, self.g_a_proj)
        conv_weight = self.conv1d.weight.squeeze(1)
        # One token after a state, without autograd: the decode kernels (they roll the conv state in place).
        decode = state is not None and T == 1 and cu_seqlens is None and not torch.is_grad_enabled()
        if decode:
            qkv, conv_state = causal_conv1d_update(qkv[:, 0], state.conv, conv_weight, activation="silu")
            qkv = qkv[:, None].chunk(3, dim=-1)
        else:
            qkv, conv_state = causal_conv1d(
                qkv,
                conv_weight,
                activation="silu",
                initial_state=None if state is None else state.conv,
                output_final_state=return_state,
                cu_seqlens=cu_seqlens,
                parts=3,
                cp_context=cp_context,
            )
        q, k, v = (t.reshape(heads_shape) for t in qkv)
        beta = torch.sigmoid(beta)
        recurrence = dict(initial_state=None if state is None else state.recurrent, output_final_state=return_state,
                          use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens)
        if decode:
            o, recurrent_state = fused_recurrent_kda(q, k, v, gate.decay(f_a), beta, **recurrence)
        else:  # the decay is computed inside the kernel from the gate's raw input (ops/kda/gate.py says why)
            o, recurrent_state = chunk_kda(q, k, v, gate.gate_input(f_a), beta, A_log=gate.A_log, dt_bias=gate.dt_bias,
                                           keep_intermediates=keep_intermediates, cp_context=cp_context,
                                           **recurrence)
        y = self.o_proj(self.o_norm(o, self.g_b_proj(g_a).view(heads_shape)).reshape(B, T, -1))
        return y, (KDAState(conv_state, recurrent_state) if return_state else None)
