"""Kimi Linear's feed-forward blocks: the dense MLP and the mixture of experts.

MoE, per token x [C]:

    scores  = sigmoid(gate.weight @ x)                         float32 [E]
    chosen  = grouped top-k of (scores + e_score_correction_bias)   the bias only chooses experts
    weights = scores[chosen] / sum(scores[chosen]) * routed_scaling_factor    (moe_renormalize)
    y       = sum_j weights_j * expert_{chosen_j}(x) + shared_experts(x)
    expert_e(x) = down_e(silu(gate_e(x)) * up_e(x))

Grouped top-k (DeepSeek-V3): experts form ``num_expert_group`` groups; each group scores as the sum of its two best
biased scores; only the ``topk_group`` best groups take part in the top-k.

The experts are stacked tensors (``gate_up_proj`` [E, 2I, C], w1 rows then w3 rows; ``down_proj`` [E, C, I]). The
token copies are sorted by expert and run through ``GroupedExperts.project`` (one grouped matmul per projection),
which a LoRA layer extends with its own per-expert low-rank product. Each copy's routing weight scales its SwiGLU
row before the down projection (``weights_j * down_e(h) = down_e(weights_j * h)``: the projection is linear), so the
expert outputs are summed as they are and need not be kept for the weights' gradient (``kimitune.ops.expert_swiglu``).

The load-balancing loss (used by the model when ``router_aux_loss_coef`` > 0) is the DeepSeek-V3 / Switch
formulation over all N tokens of the batch: ``balance = sum_e f_e * P_e``, with ``f_e = E / (k * N) * (copies
routed to e)`` and ``P_e`` the mean over tokens of the scores normalised to sum to one; it is 1 when routing is
uniform.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kimitune.model.configuration import KimiLinearConfig
from kimitune.model.projections import project_shared_input
from kimitune.ops.expert_swiglu import expert_swiglu
from kimitune.ops.grouped_mm import grouped_linear
from kimitune.ops.norm import swiglu
from kimitune.ops.permute import combine_rows, dispatch_rows, inverse_permutation, permute_rows
from kimitune.ops.router import router_logits


class KimiLinearMLP(nn.Module):
    """SwiGLU: x [..., C] -> down_proj(silu(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(*project_shared_input(x, self.gate_proj, self.up_proj)))


@dataclass
class Routing:
    """A router's decision for N tokens: weights [N, k] float32, experts [N, k] int64, scores [N, E] float32."""

    weights: torch.Tensor
    experts: torch.Tensor
    scores: torch.Tensor


class TopkRouter(nn.Module):
    """Sigmoid router with a selection-only bias and grouped top-k (transformers' KimiLinearTopkRouter)."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_token
        self.num_groups, self.topk_group = config.num_expert_group, config.topk_group
        self.renormalize, self.scaling = config.moe_renormalize, config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts))

    def forward(self, x: torch.Tensor) -> Routing:
        """x [N, C] -> Routing."""
        scores = torch.sigmoid(router_logits(x, self.weight))
        biased = scores + self.e_score_correction_bias.float()
        if self.num_groups > 1:
            group_scores = biased.view(-1, self.num_groups, self.num_experts // self.num_groups).topk(2, dim=-1)[0]
            best_groups = group_scores.sum(-1).topk(self.topk_group, dim=-1, sorted=False)[1]
            allowed = torch.zeros_like(group_scores[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
            allowed = allowed.repeat_interleave(self.num_experts // self.num_groups, dim=1)
            biased = biased.masked_fill(~allowed, float("-inf"))
        experts = biased.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return Routing(weights * self.scaling, experts, scores)


class GroupedExperts(nn.Module):
    """E SwiGLU experts held as stacked tensors; rows arrive sorted by expert with cumulative ``offsets`` [E].

    Hooks for what builds on the model: ``adapters`` maps a projection's name to a module that computes that
    projection in its place, ``adapter(weight, x, offsets) -> [N, out]`` (LoRA's ``ExpertsLora``); a frozen weight
    held as a module rather than a tensor (a quantised weight, kimitune.quant) computes its own product,
    ``weight.grouped_linear(x, offsets)``, and gives its numbers through ``weight.dequantize()``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.adapters = nn.ModuleDict()

    def project(self, name: str, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """x [N, in] sorted by expert -> [N, out] through stacked weight ``name`` ('gate_up_proj' or 'down_proj')."""
        weight = getattr(self, name)
        if name in self.adapters:
            return self.adapters[name](weight, x, offsets)
        if isinstance(weight, nn.Module):
            return weight.grouped_linear(x, offsets)
        return grouped_linear(x, weight, offsets)

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, row_weights: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, C] sorted by expert, offsets [E] int32 cumulative ends, row_weights [N] float32 (each row's routing
        weight; None: 1) -> [N, C], row i = row_weights[i] * expert(x[i])."""
        if row_weights is None:
            row_weights = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        hidden = expert_swiglu(self.project("gate_up_proj", x, offsets), row_weights)
        return self.project("down_proj", hidden, offsets)


@dataclass
class RouterTerms:
    """What the load-balancing loss needs of N routed tokens, in sums, so that the terms of pieces of a batch add up
    to the whole batch's (model/pieces.py): tokens_per_expert [E] int64 (the token copies routed to each expert),
    score_sum [E] float32 (each token's scores normalised to sum to one, summed over the tokens), num_tokens N and
    top_k."""

    tokens_per_expert: torch.Tensor
    score_sum: torch.Tensor
    num_tokens: int
    top_k: int

    def __add__(self, other: RouterTerms) -> RouterTerms:
        return RouterTerms(self.tokens_per_expert + other.tokens_per_expert, self.score_sum + other.score_sum,
                           self.num_tokens + other.num_tokens, self.top_k)

    def balance(self) -> torch.Tensor:
        """The unscaled load-balancing loss sum_e f_e * P_e (the module docstring), a float32 scalar."""
        num_experts = self.tokens_per_expert.shape[0]
        fraction = self.tokens_per_expert.float() * (num_experts / (self.top_k * self.num_tokens))
        return (fraction * (self.score_sum / self.num_tokens)).sum()


@dataclass
class MoEOutput:
    """hidden [B, T, C]; router: the routing's ``RouterTerms``."""

    hidden: torch.Tensor
    router: RouterTerms


class KimiLinearMoE(nn.Module):
    """x [B, T, C] -> MoEOutput. Names as transformers' KimiLinearMoE: ``gate``, ``experts``, ``shared_experts``."""

    def __init__(self, config: KimiLinearConfig) -> None:
        super().__init__()
        self.num_experts, self.top_k = config.num_experts, config.num_experts_per_token
        self.gate = TopkRouter(config)
        self.experts = GroupedExperts(config.num_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (
            KimiLinearMLP(config.hidden_size, config.moe_intermediate_size * config.num_shared_experts)
            if config.num_shared_experts
            else None
        )

    def forward(self, x: torch.Tensor) -> MoEOutput:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        routing = self.gate(flat)
        # Sort the N * k token copies by expert; everything stays on the device (no host sync).
        chosen = routing.experts.reshape(-1)
        order = torch.argsort(chosen, stable=True)
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, chosen, torch.ones_like(chosen))
        offsets = counts.cumsum(0).to(torch.int32)
        inverse = inverse_permutation(order)
        row_weights = permute_rows(routing.weights.reshape(-1, 1), order, inverse).view(-1)
        expert_out = self.experts(dispatch_rows(flat, order, inverse, self.top_k), offsets, row_weights)
        y = combine_rows(expert_out, order, inverse, self.top_k)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        return MoEOutput(y.view(shape).to(x.dtype), router_terms(routing, counts, self.top_k))


def load_balancing_loss(routers: list[RouterTerms], coefficient: float) -> torch.Tensor | None:
    """``coefficient`` * the mean over the MoE layers of their unscaled balance losses; None without MoE layers or
    with a coefficient of 0."""
    if not routers or coefficient <= 0:
        return None
    return coefficient * torch.stack([router.balance() for router in routers]).mean()


def router_terms(routing: Routing, counts: torch.Tensor, top_k: int) -> RouterTerms:
    """The ``RouterTerms`` of one routing decision; ``counts`` [E]: the copies routed to each expert."""
    normalised = routing.scores / routing.scores.sum(-1, keepdim=True)
    return RouterTerms(counts, normalised.sum(0), routing.scores.shape[0], top_k)
