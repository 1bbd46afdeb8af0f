"""Adapted linears that read the same input, computed together: ``project_shared_input(x, *outputs)``.

A KDA layer feeds its normed input x to six linears (q, k, v, beta, the forget gate's f_a, the output gate's g_a),
an MLA layer to two, a SwiGLU MLP to two. With LoRA on each, computed one by one, every linear runs its own
down-projection ``x A_i^T`` and, in the backward, its own ``dz_i A_i`` and ``dz_i^T x``, and autograd adds the
linears' input gradients pairwise: about 40 kernels per KDA layer for what is, per pass, one product with x.
Here (``SharedInputLora``):

    forward:   z = x [A_1; ...; A_n]^T                              one GEMM for every down-projection [N, n*r]
               y_i = x W_i^T + s z_i B_i^T                           per linear, written into its output's buffer
    backward:  dz_i = s dy_i B_i                                     into one [N, n*r] buffer
               dx = sum_i dy_i W_i + dz [A_1; ...; A_n]              one accumulating GEMM each, no separate adds
               d[A_1; ...; A_n] = dz^T x                             one GEMM
               dB_i = s dy_i^T z_i

Linears listed together in a tuple write into one buffer (``(q_proj, k_proj, v_proj)`` gives the short conv's
[..., 3 * H * K] input without a concatenation). The numbers are those of the linears one by one, up to the order of
the sums (``tests/adapters/test_shared_input.py``).

The linears join when they can: every one a ``LoraLinear`` itself (not a variant, such as CE-LoRA's), no bias, no
dropout (each linear draws its own mask on x), one rank and scale, frozen plain weights (not quantised) in x's
dtype, which is the adapters' compute dtype (no autocast). Otherwise each linear runs by itself: same results, the
kernels above. A ``LoraLinear`` that can join runs alone through the same node too: its input gradient is then one
accumulated GEMM pair, not two GEMMs and an add.

Shapes: x [..., in]; each output [..., sum of its linears' out_features].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

Output = nn.Module | tuple[nn.Module, ...]

# False: every linear runs by itself, as when they cannot join (tests compare the two ways bit for bit).
JOIN = True


def project_shared_input(x: torch.Tensor, *outputs: Output) -> tuple[torch.Tensor, ...]:
    """x [..., in] through every linear of ``outputs`` (a module, or a tuple of modules whose outputs are concatenated
    on the last dim) -> one tensor per output, as ``tuple(m(x) or torch.cat([m(x) for m in group], -1))``.

    The linears join when each says it can (``LoraLinear.joins_shared_input``) and they share one rank and scale."""
    groups = [output if isinstance(output, tuple) else (output,) for output in outputs]
    modules = [m for group in groups for m in group]
    first = modules[0]
    if all(getattr(m, "joins_shared_input", None) is not None and m.joins_shared_input(x)
           and (m.r, m.scaling) == (first.r, first.scaling) for m in modules):
        adapters = [m.adapter_weights(x.dtype) for m in modules]
        widths = [sum(m.out_features for m in group) for group in groups]
        ys = SharedInputLora.apply(x.reshape(-1, x.shape[-1]), first.scaling, [len(group) for group in groups],
                                   *(m.weight for m in modules), *(a for a, _ in adapters), *(b for _, b in adapters))
        return tuple(y.view(*x.shape[:-1], width) for y, width in zip(ys, widths))
    return tuple(group[0](x) if len(group) == 1 else torch.cat([m(x) for m in group], dim=-1) for group in groups)


def _split(tensors: Sequence, n: int) -> tuple[list, list, list]:
    return list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])


class SharedInputLora(torch.autograd.Function):
    """``apply(x [N, in], scaling, group_sizes, *weights, *lora_as, *lora_bs)`` -> one [N, out] tensor per group.

    ``weights`` [out_i, in] (frozen: they get no gradient), ``lora_as`` [r, in], ``lora_bs`` [out_i, r], one of each
    per linear in group order; ``group_sizes`` says how many consecutive linears share an output buffer.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, scaling: float, group_sizes: list[int], *tensors: torch.Tensor):
        weights, lora_as, lora_bs = _split(tensors, len(tensors) // 3)
        r = lora_as[0].shape[0]
        # The host issues every kernel of a step; a lone linear (most calls) skips the concatenation and slicing.
        lora_a = lora_as[0] if len(lora_as) == 1 else torch.cat(lora_as)
        z = x @ lora_a.T  # [N, n*r]
        outputs, i = [], 0
        for size in group_sizes:
            if size == 1:
                out = (x @ weights[i].T).addmm_(z if len(lora_as) == 1 else z[:, i * r:(i + 1) * r], lora_bs[i].T,
                                                 alpha=scaling)
                outputs.append(out)
                i += 1
                continue
            out = x.new_empty(x.shape[0], sum(w.shape[0] for w in weights[i:i + size]))
            start = 0
            for weight, lora_b in zip(weights[i:i + size], lora_bs[i:i + size]):
                part = out[:, start:start + weight.shape[0]]
                torch.mm(x, weight.T, out=part)
                part.addmm_(z[:, i * r:(i + 1) * r], lora_b.T, alpha=scaling)
                start += weight.shape[0]
                i += 1
            outputs.append(out)
        ctx.save_for_backward(x, z, lora_a, *weights, *lora_bs)
        ctx.scaling, ctx.group_sizes, ctx.r = scaling, group_sizes, r
        ctx.set_materialize_grads(False)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor | None):
        x, z, lora_a, *rest = ctx.saved_tensors
        n = len(rest) // 2
        weights, lora_bs = rest[:n], rest[n:]
        r, s = ctx.r, ctx.scaling
        # Each linear's output gradient: a column slice of its group's gradient, or None.
        parts: list[torch.Tensor | None] = []
        i = 0
        for size, grad in zip(ctx.group_sizes, grads):
            grad = None if grad is None else grad.reshape(-1, grad.shape[-1])
            start = 0
            for weight in weights[i:i + size]:
                parts.append(None if grad is None else grad[:, start:start + weight.shape[0]])
                start += weight.shape[0]
                i += 1
        dz = (x.new_zeros if any(p is None for p in parts) else x.new_empty)(x.shape[0], n * r)
        for i, part in enumerate(parts):
            if part is not None:
                dz_i = dz[:, i * r:(i + 1) * r]
                torch.addmm(dz_i, part, lora_bs[i], beta=0, alpha=s, out=dz_i)
        grad_x = None
        if ctx.needs_input_grad[0]:
            for part, weight in zip(parts, weights):
                if part is not None:
                    grad_x = part @ weight if grad_x is None else grad_x.addmm_(part, weight)
            grad_x = dz @ lora_a if grad_x is None else grad_x.addmm_(dz, lora_a)
        wants_a, wants_b = ctx.needs_input_grad[3 + n:3 + 2 * n], ctx.needs_input_grad[3 + 2 * n:]
        grad_a = (dz.T @ x).split(r) if any(wants_a) else [None] * n
        grad_b = [torch.addmm(lora_b, part.T, z[:, i * r:(i + 1) * r], beta=0, alpha=s)
                  if part is not None and wants_b[i] else None for i, (part, lora_b) in enumerate(zip(parts, lora_bs))]
        return (grad_x, None, None, *([None] * n), *grad_a, *grad_b)
