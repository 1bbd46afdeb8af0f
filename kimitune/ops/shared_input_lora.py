"""The low-rank products of linears that read one input, computed together (one node each way).

    shared_input_lora(x [N, in], scaling, group_sizes, weights, lora_as, lora_bs) -> one [N, out_g] per group

    forward:   z = x [A_1; ...; A_n]^T                              one GEMM for every down-projection [N, n*r]
               y_i = x W_i^T + s z_i B_i^T                           per linear, written into its group's buffer
    backward:  dz_i = s dy_i B_i                                     into one [N, n*r] buffer
               dx = sum_i dy_i W_i + dz [A_1; ...; A_n]              one accumulating GEMM each, no separate adds
               d[A_1; ...; A_n] = dz^T x                             one GEMM
               dB_i = s dy_i^T z_i

With LoRA on each of a KDA layer's six projections, computed one by one, every linear runs its own down-projection
and, in the backward, its own ``dz_i A_i`` and ``dz_i^T x``, and autograd adds the linears' input gradients
pairwise: about 40 kernels per KDA layer for what is, per pass, one product with x. ``weights`` [out_i, in] are
frozen (no gradient); ``lora_as`` [r, in] and ``lora_bs`` [out_i, r] in x's dtype; ``group_sizes`` says how many
consecutive linears share an output buffer (q, k and v give the short conv's [N, 3 * H * K] input without a
concatenation). The reference is the linears one by one (``kimitune.model.projections`` runs them so when they
cannot join); the numbers agree up to the order of the sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def shared_input_lora(x: torch.Tensor, scaling: float, group_sizes: list[int], weights: Sequence[torch.Tensor],
                      lora_as: Sequence[torch.Tensor], lora_bs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """See the module docstring; returns one [N, sum of the group's out_i] tensor per group."""
    return SharedInputLora.apply(x, scaling, group_sizes, *weights, *lora_as, *lora_bs)


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
