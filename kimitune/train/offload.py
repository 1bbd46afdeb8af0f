"""Activation offloading: what the forward saves for the backward kept in pinned host memory (``HostOffload``).

With every layer recomputed, what a step saves is each layer's input, the states between a layer's pieces
(model/pieces.py) and the loss's inputs: at 262,144 tokens the 48B's 27 layer inputs alone are 30 GiB. Under
``HostOffload`` each CUDA tensor autograd saves (``torch.autograd.graph.saved_tensors_hooks``; torch.utils.checkpoint
saves a recomputed region's inputs this way too, while what the region computes inside is never saved) is copied
to pinned host memory on a side stream, so the copy overlaps the forward's compute, and its GPU memory returns to
the allocator once the copy is done (``record_stream``). The backward copies each one back when it needs it
(asynchronously, from pinned memory). Small tensors (under ``min_bytes``) stay on the GPU: their copies would cost
more than they hold. On the CPU nothing changes.

    with HostOffload():
        loss = model(...).loss
    loss.backward()
"""

from __future__ import annotations

import torch

MIN_BYTES = 1 << 20


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """The forward's saved CUDA tensors of at least ``min_bytes``, in pinned host memory until the backward."""

    def __init__(self, min_bytes: int = MIN_BYTES) -> None:
        self.min_bytes = min_bytes
        self.stream: torch.cuda.Stream | None = None
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        if not tensor.is_cuda or tensor.numel() * tensor.element_size() < self.min_bytes:
            return tensor
        if self.stream is None:
            self.stream = torch.cuda.Stream(tensor.device)
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor is written before it is read
        with torch.cuda.stream(self.stream):
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is not handed out again before the copy has read it
        return tensor.device, host

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        if self.stream is not None:  # the copy out is finished before the copy back reads the host buffer
            torch.cuda.current_stream(device).wait_stream(self.stream)
        return host.to(device, non_blocking=True)
