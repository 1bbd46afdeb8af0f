"""CPU tensors that say they are on CUDA, so that a test without a GPU can see which path a dispatcher takes.

``cuda_looking(t)`` is ``t`` (same storage, same autograd history) whose ``is_cuda`` is True; every tensor computed
from it is a plain CPU tensor again, so a reference path runs on it as on any CPU tensor. Only ``is_cuda`` lies:
``device`` stays cpu.
"""

from __future__ import annotations

import torch


class CudaLooking(torch.Tensor):
    @property
    def is_cuda(self) -> bool:
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # Results as plain tensors: only the dispatcher's own inputs look like CUDA tensors.
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def cuda_looking(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(CudaLooking)
