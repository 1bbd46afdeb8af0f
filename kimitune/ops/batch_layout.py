"""Where the sequences of a packed batch start and end, in every form the kernels read: ``BatchLayout``.

A packed batch is one row [1, total] of sequences back to back, with ``cu_seqlens`` int32 [n + 1] (0 .. total). fla's
kernels need the bounds on the GPU and, to size their chunk tables without reading the GPU back, a host copy; the
short conv needs each token's position in its sequence; varlen attention the longest length; the loss the last
token of each sequence. The model builds one layout per batch (``BatchLayout.of``) and hands that same object to
every layer, and a recomputed layer gets it again, so each form is made once per batch: no cache keyed by tensor
identity, no sync. It is a plain dataclass, which FSDP's input moving passes through untouched (the host copy stays
on the host). The context-parallel work splits a layout into per-rank pieces.

Every op that takes ``cu_seqlens`` takes a layout or an int32 tensor (made into a layout for that one call).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    """cu_seqlens: int32 [n + 1] on the compute device; cu_seqlens_cpu: the same on the host, or None when the bounds
    were given on the device only (then ``max_seqlen`` reads them back once); total: the row's tokens."""

    cu_seqlens: torch.Tensor
    cu_seqlens_cpu: torch.Tensor | None
    total: int

    @classmethod
    def of(cls, cu_seqlens: torch.Tensor | BatchLayout | None, device: torch.device | str,
           total: int | None = None) -> BatchLayout | None:
        """The layout of ``cu_seqlens`` for tensors on ``device`` whose packed row holds ``total`` tokens: a layout is
        returned as is; a host tensor is copied to the device once (asynchronously) and kept beside its copy.
        ``total`` may be left out when the bounds are on the host (it is their last one)."""
        if cu_seqlens is None or isinstance(cu_seqlens, BatchLayout):
            return cu_seqlens
        device = torch.device(device)
        host = cu_seqlens if cu_seqlens.device.type == "cpu" else None
        if total is None:
            total = int(cu_seqlens[-1])  # free for host bounds; device-only bounds are read back once
        if cu_seqlens.device == device:
            return cls(cu_seqlens, host, total)
        if host is None:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, the tensors on {device}: give it on the host or "
                             "on their device")
        staged = cu_seqlens.pin_memory() if device.type == "cuda" else cu_seqlens
        return cls(staged.to(device, non_blocking=True), host, total)

    @property
    def checked_bounds(self) -> torch.Tensor:
        """The bounds that input checks read: the host copy when there is one (checking it costs no sync), else the
        device bounds."""
        return self.cu_seqlens_cpu if self.cu_seqlens_cpu is not None else self.cu_seqlens

    @functools.cached_property
    def host_bounds(self) -> torch.Tensor:
        """The bounds on the host: the host copy, or (a device-only layout) the device bounds read back once."""
        return self.cu_seqlens_cpu if self.cu_seqlens_cpu is not None else self.cu_seqlens.cpu()

    @functools.cached_property
    def max_seqlen(self) -> int:
        """The longest sequence's length (from the host bounds)."""
        bounds = self.host_bounds
        return int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """int32 [total] on the device: each token's position in its sequence."""
        from kimitune.ops.conv import sequence_positions

        return sequence_positions(1, self.total, self.cu_seqlens, self.cu_seqlens.device).to(torch.int32)

    @functools.cached_property
    def last_tokens(self) -> torch.Tensor:
        """int64 [n] on the device: the index of each sequence's last token (an empty sequence: its start, clamped)."""
        return (self.cu_seqlens[1:] - 1).clamp_min(0).to(torch.long)
