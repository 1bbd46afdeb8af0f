"""Operators with one API everywhere: fla-core's Triton kernels for CUDA tensors (the training short conv: the
project's, short_conv.py), the project's PyTorch code elsewhere (kimitune/ops/kda/chunk.py, recurrent.py,
conv.py). Both follow fla's argument conventions.

KDA: q, k, g [B, T, H, K] (g the per-channel log decay); v [B, T, H, V]; beta [B, T, H]; states [N, H, K, V] in
float32. With ``cu_seqlens`` [N+1] (int32 or int64, B = 1) each packed sequence starts from its own initial state
(or zeros) and returns its own final state. ``cu_seqlens`` is a ``BatchLayout`` (batch_layout.py: the bounds on the
device and the host, built once per batch) or a tensor, made into a layout for the call: on CUDA give it on the host,
so that no kernel reads the bounds back.

Names, in every module of kimitune.ops: an op ``foo`` that picks between a kernel and PyTorch code (a dispatcher)
has ``foo_reference``, the same computation in PyTorch ops with the same arguments and results: the path where no
kernel applies (CPU tensors, other dtypes), the one :func:`force_reference` (or KIMITUNE_REFERENCE_OPS=1) makes
every dispatcher take, and what the tests hold the kernels to. ``foo_triton`` (or ``foo_forward_triton`` /
``foo_backward_triton``) launches kimitune's Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1;
triton_utils.py holds what they share). An in-place op's trailing underscore stays last: ``softmax_grad_``,
``softmax_grad_reference_``, ``softmax_grad_triton_``. KDA's definition, the per-token recurrence in a plain loop
that every KDA path is tested against, is :func:`recurrent_kda_reference` (fla's ``naive_recurrent_kda``).

Context parallelism on CUDA (model/context_parallel.py): ``chunk_kda`` and ``causal_conv1d`` take ``cp_context``,
fla-core's ``FLACPContext`` for this rank's tokens of a row (:func:`context_parallel_context`); with it they run
fla's context-parallel kernels, which pass the states between the ranks themselves (no states in or out, the bounds
the context's). It has no PyTorch path: it needs CUDA tensors and fla-core, the references not forced.

Forcing the references, also on a GPU: KIMITUNE_REFERENCE_OPS=1 in the environment (read once, at import), or
``force_reference(True)`` from code (``with force_reference():`` for a block); ``reference_forced()`` tells which.
Every dispatcher of kimitune.ops reads it at each call (reference_switch.py).
"""

from __future__ import annotations

import torch

from kimitune.ops.batch_layout import BatchLayout
from kimitune.ops.conv import causal_conv1d_reference, causal_conv1d_update_reference, check_conv_inputs
from kimitune.ops.kda import fla
from kimitune.ops.kda.fla import context_parallel_context
from kimitune.ops.kda.chunk import chunk_kda_reference
from kimitune.ops.kda.gate import kda_decay
from kimitune.ops.kda.naive import recurrent_kda_reference
from kimitune.ops.kda.recurrent import fused_recurrent_kda_reference
from kimitune.ops.reference_switch import force_reference, reference_forced, use_kernels
from kimitune.ops.short_conv import conv_silu


def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | BatchLayout | None = None,
    A_log: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    keep_intermediates: bool = False,
    cp_context=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA over whole sequences (training, prefill), chunkwise; differentiable in every tensor argument.

    o_t = S_t^T (scale * q_t) with S_t = (I - beta_t k_t k_t^T) Diag(exp g_t) S_{t-1} + beta_t k_t v_t^T;
    ``scale`` defaults to K^-0.5; ``use_qk_l2norm_in_kernel`` l2-normalises q and k first (x / sqrt(|x|^2 + 1e-6)).
    With ``A_log`` [H] (and ``dt_bias`` [H * K]) ``g`` is the forget gate's raw input and the log decay is
    ``kda_decay(g, A_log, dt_bias)``, computed inside fla's kernels on CUDA (kda/gate.py says why).
    ``keep_intermediates`` (CUDA): fla keeps its chunk states and WY factors for the backward instead of
    recomputing them there (fla's ``disable_recompute``); the same results, faster, for 18 more bytes per token and
    H * K channel at K = V = 128 (``kimitune.plan``). The PyTorch path (:func:`chunk_kda_reference`) keeps what
    autograd needs either way.
    ``cp_context`` (CUDA only): fla's context parallelism over this rank's tokens q [1, L, H, K] of a row (the
    module docstring); no ``cu_seqlens``, ``initial_state`` or ``output_final_state`` with it.
    Returns (o [B, T, H, V] in q's dtype, final state [N, H, K, V] in float32, or None unless
    ``output_final_state``).
    """
    layout = BatchLayout.of(cu_seqlens, q.device, q.shape[1])
    if cp_context is not None:
        _check_context_parallel(q, "chunk_kda")
    if use_kernels(q):
        return fla.chunk_kda(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                             layout, A_log, dt_bias, keep_intermediates, cp_context=cp_context)
    if A_log is not None:
        g = kda_decay(g, A_log, dt_bias)
    return chunk_kda_reference(q, k, v, g, beta, scale, initial_state, output_final_state, use_qk_l2norm_in_kernel,
                               _bounds(layout))


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    cu_seqlens: torch.Tensor | BatchLayout | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """KDA token by token (decoding: a few tokens per sequence from a state); same arguments and results as
    :func:`chunk_kda`. fla's kernel is forward-only; the PyTorch path is differentiable through autograd."""
    layout = BatchLayout.of(cu_seqlens, q.device, q.shape[1])
    if use_kernels(q):
        return fla.fused_recurrent_kda(q, k, v, g, beta, scale, initial_state, output_final_state,
                                       use_qk_l2norm_in_kernel, layout)
    return fused_recurrent_kda_reference(q, k, v, g, beta, scale, initial_state, output_final_state,
                                         use_qk_l2norm_in_kernel, _bounds(layout))


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | BatchLayout | None = None,
    parts: int = 1,
    cp_context=None,
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | None]:
    """Causal depthwise conv y[t] = act(bias + sum_i weight[:, i] x[t-W+1+i]) of x [B, T, D] with weight [D, W];
    packed sequences (``cu_seqlens``, B = 1) never read each other's tokens, and taps before a sequence's start read
    its ``initial_state`` [N, D, W] (the last W inputs, oldest first; zeros when None). ``activation``: None or
    'silu'. Returns (y [B, T, D], final state [N, D, W] in x's dtype, or None unless ``output_final_state``);
    with ``parts`` > 1, y as a tuple of ``parts`` tensors [B, T, D / parts] (its channels in order; contiguous each
    on CUDA's training path). On CUDA the training case (SiLU, no bias, no states) runs kimitune's kernels
    (short_conv.py), the rest fla's. ``cp_context`` (CUDA only): fla's context-parallel conv over this rank's
    tokens x [1, L, D] (the first taps of a sequence that began on an earlier rank read its last inputs), SiLU or
    not: kimitune's kernel reads no other rank's tokens; no ``cu_seqlens`` or states with it."""
    if x.shape[-1] % parts:
        raise ValueError(f"causal_conv1d: {x.shape[-1]} channels do not split into {parts} parts")
    layout = BatchLayout.of(cu_seqlens, x.device, x.shape[1])
    if cp_context is not None:
        _check_context_parallel(x, "causal_conv1d")
        y, state = fla.causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, layout,
                                     cp_context=cp_context)
        return (y if parts == 1 else y.chunk(parts, dim=-1)), state
    if use_kernels(x) and activation == "silu" and bias is None and initial_state is None and not output_final_state:
        check_conv_inputs(x, weight, bias, activation, initial_state, None if layout is None else layout.checked_bounds, "causal_conv1d")
        return conv_silu(x, weight, layout, parts), None
    if use_kernels(x):
        y, state = fla.causal_conv1d(x, weight, bias, activation, initial_state, output_final_state, layout)
    else:
        y, state = causal_conv1d_reference(x, weight, bias, activation, initial_state, output_final_state,
                                           _bounds(layout))
    return (y if parts == 1 else y.chunk(parts, dim=-1)), state


def _check_context_parallel(x: torch.Tensor, where: str) -> None:
    """fla's context parallelism has no PyTorch path: refuses a call that could not run its kernels."""
    if not use_kernels(x) or not fla.kernels_available():
        why = ("the references are forced" if x.is_cuda and reference_forced() else
               f"the tensors are on {x.device.type}" if not x.is_cuda else "fla-core does not import")
        raise ValueError(f"{where}: cp_context (fla-core's context parallelism) needs CUDA tensors and fla-core's "
                         f"kernels ({why}); without them, leave it None and pass the states between the ranks "
                         "(model/context_parallel.py)")


def _bounds(layout: BatchLayout | None) -> torch.Tensor | None:
    """The bounds tensor the PyTorch paths take (on the inputs' device)."""
    return None if layout is None else layout.cu_seqlens


def causal_conv1d_update(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of :func:`causal_conv1d`: x [N, D] -> (y [N, D], conv_state). ``conv_state`` [N, D, W] is
    rolled in place (the oldest input drops out, x comes in) and returned, on every device."""
    if use_kernels(x):
        return fla.causal_conv1d_update(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_reference(x, conv_state, weight, bias, activation)


__all__ = ["BatchLayout", "context_parallel_context", "chunk_kda", "fused_recurrent_kda", "causal_conv1d",
           "causal_conv1d_update", "recurrent_kda_reference", "kda_decay", "force_reference", "reference_forced"]
