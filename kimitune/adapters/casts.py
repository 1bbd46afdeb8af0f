"""The adapters' compute-dtype copies, made for all adapted linears of a model in one autograd node.

A LoRA adapter is stored in float32 and multiplied in the frozen layer's dtype (bf16), so each adapted linear casts
``lora_A`` and ``lora_B`` in the forward and their gradients back in the backward: four kernels of a few KiB
each: the 48B has about 290 adapted linears, so four launches per linear add up to a visible share of the step
and as much host time (``benchmarks/RESULTS.md`` has the figures). ``AdapterCasts`` casts every adapted linear's pair at once:
the float32 tensors are concatenated, cast and split into views (``CastTogether``), and the backward concatenates
the bf16 gradients and casts them back together. Same numbers as the per-layer casts, bit for bit.

When the copies are remade (``AdapterCasts.weights``): the first time an adapted linear asks in a forward with
gradients after its adapter changed in place (the optimizer's step; checked by the Parameters' version
counters), or after the previous copies' backward ran. A pass without gradients (evaluation) casts per layer and
leaves the copies alone. Stacked experts' adapters keep their own casts: they are few, large tensors, whose bf16
gradients this node would hold until the end of the backward.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable


class CastTogether(torch.autograd.Function):
    """``CastTogether.apply(dtype, on_backward, *tensors)``: every tensor cast to ``dtype`` in one concatenation
    and one cast.

    Shapes: any; the outputs are views of one flat buffer with the inputs' shapes. The backward concatenates the
    outputs' gradients (those that have one), casts them to the inputs' dtype and splits them; an output without
    a gradient gives its input none. ``on_backward`` (the second argument): None, or a weak reference
    (``weakref.WeakMethod``) to a callable called when the backward has run, if it is still alive.
    """

    @staticmethod
    def forward(ctx, dtype: torch.dtype, on_backward, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        ctx.shapes = [t.shape for t in tensors]
        ctx.source_dtype = tensors[0].dtype
        ctx.on_backward = on_backward
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        return tuple(part.view(shape) for part, shape in zip(flat.split([t.numel() for t in tensors]), ctx.shapes))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor | None):
        present = [i for i, grad in enumerate(grads) if grad is not None]
        out: list[torch.Tensor | None] = [None] * len(grads)
        if present:
            flat = torch.cat([grads[i].reshape(-1) for i in present]).to(ctx.source_dtype)
            for i, part in zip(present, flat.split([grads[i].numel() for i in present])):
                out[i] = part.view(ctx.shapes[i])
        on_backward = ctx.on_backward() if ctx.on_backward is not None else None
        if on_backward is not None:
            on_backward()
        return (None, None, *out)


@dataclass
class _Copy:
    """One module's compute copies and the state of its Parameters when they were made."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    versions: tuple[int, int, int, int]


@functools.cache
def _sharded_type() -> type | None:
    """DTensor (FSDP2's sharded Parameters, which cannot join a plain concatenation), or None without
    torch.distributed."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def _versions(module: nn.Module) -> tuple[int, int, int, int]:
    a, b = module.lora_A, module.lora_B
    return a._version, b._version, a.data_ptr(), b.data_ptr()


class AdapterCasts:
    """The compute-dtype copies of the ``lora_A`` / ``lora_B`` of a model's adapted linears (see the module doc).

    ``apply_lora`` makes one per model and gives each adapted linear a reference (``module.adapter_casts``).
    Shapes are the adapters' own: ``lora_A`` [r, in], ``lora_B`` [out, r].
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)
        self.dtype: torch.dtype | None = None
        self.copies: dict[int, _Copy] = {}
        # Off for good once the adapters cannot be concatenated: sharded (FSDP2's DTensors) or on several devices.
        self.enabled = True

    def weights(self, module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``module``'s ``(lora_A, lora_B)`` in ``dtype``: the shared copies in a pass with gradients."""
        lora_a, lora_b = module.lora_A, module.lora_B
        if lora_a.dtype == dtype and lora_b.dtype == dtype:
            return lora_a, lora_b
        if not (self.enabled and torch.is_grad_enabled() and lora_a.requires_grad):
            return lora_a.to(dtype), lora_b.to(dtype)
        copy = self.copies.get(id(module))
        if copy is None or dtype != self.dtype or copy.versions != _versions(module):
            self._cast_all(dtype)
            copy = self.copies.get(id(module))
            if copy is None:
                return lora_a.to(dtype), lora_b.to(dtype)
        return copy.lora_a, copy.lora_b

    def _cast_all(self, dtype: torch.dtype) -> None:
        self.copies = {}
        modules = [m for m in self.modules if m.lora_A.requires_grad and m.lora_B.requires_grad]
        tensors = [t for m in modules for t in (m.lora_A, m.lora_B)]
        if not tensors:
            return
        first, sharded = tensors[0], _sharded_type()
        if any((sharded is not None and isinstance(t, sharded)) or t.device != first.device or t.dtype != first.dtype
               for t in tensors):
            self.enabled = False
            return
        # A weak reference: the copies hold this node, whose context would otherwise hold the copies through
        # ``self``, a cycle through autograd's C++ graph that Python's collector cannot see (it kept a deleted
        # model's adapted linears, frozen weights and all, alive).
        cast = CastTogether.apply(dtype, weakref.WeakMethod(self._consumed), *tensors)
        self.dtype = dtype
        self.copies = {
            id(m): _Copy(cast[2 * i], cast[2 * i + 1], _versions(m)) for i, m in enumerate(modules)
        }

    def _consumed(self) -> None:
        # Their backward has run: the next pass with gradients makes new copies (and a new autograd node).
        self.copies = {}
