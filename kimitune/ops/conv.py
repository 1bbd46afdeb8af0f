"""Causal depthwise short convolution (the KDA layer's q/k/v convs) in PyTorch: packed-aware, with a decode step.

    y[t] = act(bias + sum_i weight[:, i] * x[t - (W-1) + i])

x: [B, T, D]; weight: [D, W]; states: [N, D, W], fla's layout: the last W inputs of a sequence, oldest first.
Every sequence (a batch row, or a ``cu_seqlens`` segment of a packed row) reads only its own tokens; taps that
reach before its first token read its initial state (zeros without one). The whole batch runs as one depthwise
conv over the flattened rows; the few outputs whose taps crossed a sequence start (the first W-1 tokens of each
sequence) are then corrected in one vectorised gather. Gradients flow through autograd.

``causal_conv1d_reference`` and ``causal_conv1d_update_reference`` are ``kimitune.ops.causal_conv1d`` and
``causal_conv1d_update`` off CUDA and under ``kimitune.ops.force_reference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kimitune.ops.kda.checks import check_cu_seqlens

_ACTIVATIONS = (None, "silu", "swish")


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def check_conv_inputs(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    where: str,
) -> int:
    """Checks a short-conv call (x [B, T, D] or [N, D] for a decode step); returns N, the number of sequences."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"{where}: unsupported activation {activation!r}; use None, 'silu' or 'swish'")
    if x.dim() not in (2, 3):
        raise ValueError(f"{where}: x must be [B, T, D] (or [N, D] for a decode step), got {list(x.shape)}")
    D = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != D:
        raise ValueError(f"{where}: weight must be [D, W] = [{D}, W], got {list(weight.shape)}")
    if bias is not None and list(bias.shape) != [D]:
        raise ValueError(f"{where}: bias must be [D] = [{D}], got {list(bias.shape)}")
    if x.dim() == 2:
        N = x.shape[0]
    elif cu_seqlens is None:
        N = x.shape[0]
    else:
        N = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], where)
    if state is not None and list(state.shape) != [N, D, weight.shape[1]]:
        raise ValueError(
            f"{where}: conv state must be [N, D, W] = {[N, D, weight.shape[1]]} (one per sequence), "
            f"got {list(state.shape)}"
        )
    return N


def _sequence_bounds(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device):
    """(starts [N], lengths [N], sequence of each flat token [B*T], position of each token in its sequence)."""
    if cu_seqlens is None:
        starts = torch.arange(B, device=device) * T
        lens = torch.full((B,), T, device=device)
    else:
        cu = cu_seqlens.to(device=device, dtype=torch.long)
        starts, lens = cu[:-1], cu[1:] - cu[:-1]
    seq = torch.repeat_interleave(torch.arange(lens.numel(), device=device), lens, output_size=B * T)
    pos = torch.arange(B * T, device=device) - starts[seq]
    return starts, lens, seq, pos


def sequence_positions(B: int, T: int, cu_seqlens: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The position of each of the B*T flat tokens in its sequence (a batch row, or a ``cu_seqlens`` segment),
    [B*T] int64 on ``device``; no host sync when ``cu_seqlens`` is on ``device``."""
    return _sequence_bounds(B, T, cu_seqlens, device)[3]


def causal_conv1d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, T, D] -> (y [B, T, D], final state [N, D, W] in x's dtype or None). See ``kimitune.ops.causal_conv1d``."""
    N = check_conv_inputs(x, weight, bias, activation, initial_state, cu_seqlens, "causal_conv1d")
    B, T, D = x.shape
    W = weight.shape[1]
    weight = weight.to(x.dtype)
    flat = x.reshape(B * T, D)
    # One causal conv over all rows back to back, left-padded with W-1 zeros: [B*T, D].
    y = F.conv1d(F.pad(flat.t()[None], (W - 1, 0)), weight[:, None, :], groups=D)[0].t()

    starts, lens, seq, pos = _sequence_bounds(B, T, cu_seqlens, x.device)
    # Correct the outputs whose taps reached before their sequence's start (first W-1 tokens of each sequence):
    # tap i sits `offset = W-1-i` tokens back; it read x[t - offset] (or the zero pad) instead of the state.
    near_start = torch.nonzero(pos < W - 1).flatten()
    if near_start.numel():
        offset = torch.arange(W - 1, -1, -1, device=x.device)  # [W]
        p = pos[near_start, None]
        outside = offset[None, :] > p  # [n, W] taps before the sequence start
        src = near_start[:, None] - offset[None, :]
        wrong = flat[src.clamp(min=0)] * (outside & (src >= 0))[..., None]  # [n, W, D]
        fix = -wrong
        if initial_state is not None:
            slot = (W - offset[None, :] + p).clamp(max=W - 1)  # state slot of x[t - offset]
            state = initial_state.to(x.dtype)[seq[near_start]]  # [n, D, W]
            right = state.gather(2, slot[:, None, :].expand(-1, D, -1)).transpose(1, 2)  # [n, W, D]
            fix = fix + right * outside[..., None]
        y = y.index_add(0, near_start, (fix * weight.t()[None]).sum(1))
    if bias is not None:
        y = y + bias.to(x.dtype)
    y = _activate(y, activation).reshape(B, T, D)

    final = None
    if output_final_state:
        # The last W inputs of each sequence, oldest first; slots before its start come from the initial state.
        back = torch.arange(W, device=x.device) - W  # [W]: -W .. -1
        src = starts[:, None] + lens[:, None] + back[None, :]  # [N, W]
        inside = (lens[:, None] + back[None, :]) >= 0
        final = (flat[src.clamp(min=0)] * inside[..., None]).transpose(1, 2)  # [N, D, W]
        if initial_state is not None:
            slot = (lens[:, None] + back[None, :] + W).clamp(max=W - 1)
            carried = initial_state.to(x.dtype).gather(2, slot[:, None, :].expand(-1, D, -1))
            final = final + carried * ~inside[:, None, :]
    return y, final


def causal_conv1d_update_reference(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step, x [N, D] -> (y [N, D], conv_state); ``conv_state`` [N, D, W] is updated in place (as fla
    does) and returned. Computes in float32 (float64 for float64 states)."""
    check_conv_inputs(x, weight, bias, activation, conv_state, None, "causal_conv1d_update")
    acc = torch.float64 if conv_state.dtype == torch.float64 else torch.float32
    window = torch.cat([conv_state[..., 1:], x[..., None].to(conv_state.dtype)], dim=-1)
    y = (window.to(acc) * weight.to(acc)).sum(-1)
    if bias is not None:
        y = y + bias.to(acc)
    conv_state.copy_(window)
    return _activate(y, activation).to(x.dtype), conv_state
