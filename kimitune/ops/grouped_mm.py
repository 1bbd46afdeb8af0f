"""Grouped expert matmul: rows sorted by expert, each group multiplied by its own expert's weight.

``grouped_linear(x [N, in], weight [E, out, in], offsets [E] int32) -> [N, out]``, where rows
``offsets[e-1]:offsets[e]`` (cumulative ends, ``offsets[-1] == N``) belong to expert ``e``: ``y = x @ weight[e].T``.

``torch._grouped_mm`` runs it as one kernel, forward and backward, with no host sync. In torch 2.13 it works on
CPU (float32 and bfloat16) and on CUDA for bfloat16 on Hopper or newer, when every row stride is a multiple of
16 bytes (``in`` and ``out`` times the element size); elsewhere, and under ``kimitune.ops.force_reference``,
``grouped_linear_reference`` (one matmul per expert, which reads ``offsets`` on the host) computes the same thing.
"""

from __future__ import annotations

import torch

from kimitune.ops.reference_switch import reference_forced


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """autocast's dtype inside an autocast region (the op is not on autocast's lists), else the promoted dtype."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return torch.promote_types(x.dtype, weight.dtype)


def _grouped_mm_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(size * x.element_size() % 16 == 0 for size in weight.shape[1:])
    if not aligned:
        return False
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return False


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The reference: one ``x[group] @ weight[e].T`` per expert (syncs once to read ``offsets``)."""
    ends = offsets.tolist()
    starts = [0] + ends[:-1]
    parts = [x[s:e] @ weight[i].T for i, (s, e) in enumerate(zip(starts, ends)) if e > s]
    if not parts:
        return x.new_zeros(x.shape[0], weight.shape[1])
    return torch.cat(parts)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """x [N, in] (rows sorted by expert), weight [E, out, in], offsets [E] int32 cumulative ends -> [N, out]."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"grouped_linear: x {tuple(x.shape)} and weight {tuple(weight.shape)} must be [N, in] and "
                         "[E, out, in]")
    if offsets.shape != (weight.shape[0],):
        raise ValueError(f"grouped_linear: offsets {tuple(offsets.shape)} must hold one end per expert "
                         f"({weight.shape[0]})")
    dtype = _compute_dtype(x, weight)
    x, weight = x.to(dtype), weight.to(dtype)
    if not reference_forced() and _grouped_mm_supported(x, weight):
        with torch.autocast(x.device.type, enabled=False):
            return torch._grouped_mm(x.contiguous(), weight.transpose(-2, -1), offs=offsets.to(torch.int32))
    return grouped_linear_reference(x, weight, offsets)
