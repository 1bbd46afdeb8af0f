"""CE-LoRA: exact forward, LoRA's gradients when nothing is dropped, the paper's error behaviour, smaller GEMMs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from adapter_helpers import randomize_lora, tiny_config, token_ids
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from kimitune import KimiLinearForCausalLM
from kimitune.adapters import (
    LoraSettings,
    LoraTargetError,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    save_adapter,
)
from kimitune.adapters.ce_amm import (
    ApproxGroupedLinearFunction,
    ApproxLinearFunction,
    RowSampledInputGrad,
    adaptive_row_count,
    kept_row_count,
)
from kimitune.adapters.ce_lora import CeLoraLinear, CeLoraSettings, apply_ce_lora, approximated_modules
from kimitune.adapters.layers import LoraLinear
from kimitune.config import ConfigError, parse_config
from kimitune.ops.grouped_mm import grouped_linear_reference
from kimitune.train.settings import ce_lora_settings

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = LoraSettings(r=4, alpha=8, target_linear=True, target_experts=True)


def pretrained_like(out_features: int, in_features: int, decay: float = 0.8, seed: int = 0) -> torch.Tensor:
    """A weight with a decaying spectrum (s_j = decay^j), as trained weights have (random ones are flat)."""
    generator = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator))[0]
    v = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator))[0]
    rank = min(out_features, in_features)
    return (u[:, :rank] * decay ** torch.arange(rank)) @ v[:, :rank].T


def grad_with_columns(rows: int, columns: int, seed: int = 1) -> torch.Tensor:
    """dY whose column norms vary over two orders of magnitude (a few output channels carry most gradient)."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.logspace(0, -2, columns)[torch.randperm(columns, generator=generator)]
    return torch.randn(rows, columns, generator=generator) * scale


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def linear_input_grad(weight, grad_output, sparsity, double_rank, adaptive=False):
    approx = RowSampledInputGrad(weight, sparsity, double_rank, refresh_steps=10, adaptive=adaptive)
    x = torch.zeros(grad_output.shape[0], weight.shape[1], requires_grad=True)
    ApproxLinearFunction.apply(x, weight, None, approx).backward(grad_output)
    return x.grad, approx


def model_pair(ce: CeLoraSettings, seed: int = 0, lora_settings: LoraSettings = ALL):
    """Identical float32 models with identical adapters: plain LoRA and CE-LoRA."""
    torch.manual_seed(seed)
    lora = KimiLinearForCausalLM(tiny_config()).train()
    ce_model = KimiLinearForCausalLM(tiny_config()).train()
    ce_model.load_state_dict(lora.state_dict())
    apply_lora(lora, lora_settings)
    apply_ce_lora(ce_model, ALL, ce)
    randomize_lora(lora)
    randomize_lora(ce_model)
    return lora, ce_model


def lora_grads(model, input_ids) -> dict[str, torch.Tensor]:
    model(input_ids, labels=input_ids).loss.backward()
    return {f"{name}.{part}": getattr(m, part).grad for name, m in lora_modules(model).items()
            for part in ("lora_A", "lora_B")}


# ----- nothing dropped: LoRA exactly --------------------------------------------------------------------------


def test_sparsity_zero_gives_lora_gradients_exactly(input_ids, monkeypatch):
    # CE-LoRA's linears run one by one (model/projections.py): so must plain LoRA's, for the same sums.
    lora, ce_model = model_pair(CeLoraSettings(sparsity=0.0), lora_settings=dataclasses.replace(ALL, join_shared_input=False))
    assert not approximated_modules(ce_model)
    expected, got = lora_grads(lora, input_ids), lora_grads(ce_model, input_ids)
    assert expected.keys() == got.keys() and len(got) == 2 * len(lora_modules(lora))
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_layer_input_gradient_equals_lora_when_nothing_is_dropped():
    torch.manual_seed(0)
    base = nn.Linear(40, 24, bias=True)
    lora, ce_layer = LoraLinear(base, r=4, alpha=8), CeLoraLinear(base, r=4, alpha=8)
    ce_layer.load_state_dict(lora.state_dict())
    nn.init.normal_(lora.lora_B), ce_layer.lora_B.data.copy_(lora.lora_B)
    ce_layer.approximate(sparsity=0.0, double_rank=8, refresh_steps=1, adaptive=False)
    assert ce_layer.approx is None
    x = torch.randn(3, 5, 40)
    grads = []
    for layer in (lora, ce_layer):
        xi = x.clone().requires_grad_(True)
        layer(xi).square().sum().backward()
        grads.append((xi.grad, layer.lora_A.grad, layer.lora_B.grad))
    for expected, got in zip(*grads):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("double_rank", [0, 8])
def test_amm_formula_with_every_row_kept_is_exact(double_rank):
    """The reduced products themselves (not a shortcut) give dY W when S holds every row."""
    weight = torch.randn(24, 40)
    grad_output = torch.randn(30, 24)
    got, approx = linear_input_grad(weight, grad_output, sparsity=1e-9, double_rank=double_rank)
    assert approx.kept_rows == 24 and approx.double_rank == double_rank
    torch.testing.assert_close(got, grad_output @ weight, rtol=1e-5, atol=1e-5)

    stack = torch.randn(3, 24, 40)
    offsets = torch.tensor([7, 7, 30], dtype=torch.int32)  # expert 1 has no rows
    approx = RowSampledInputGrad(stack, 1e-9, double_rank, refresh_steps=10, adaptive=False)
    x = torch.zeros(30, 40, requires_grad=True)
    ApproxGroupedLinearFunction.apply(x, stack, offsets, approx).backward(grad_output)
    torch.testing.assert_close(x.grad, grouped_linear_reference(grad_output, stack.transpose(1, 2), offsets),
                               rtol=1e-5, atol=1e-5)


def test_forward_is_exact_and_loss_equals_lora(input_ids):
    # One by one, as CE-LoRA's linears run: a joint GEMM sums in another order on some CPUs' BLAS.
    lora, ce_model = model_pair(CeLoraSettings(sparsity=0.5), lora_settings=dataclasses.replace(ALL, join_shared_input=False))
    assert approximated_modules(ce_model)
    assert torch.equal(ce_model(input_ids, labels=input_ids).loss, lora(input_ids, labels=input_ids).loss)


# ----- the approximation behaves as the paper says -------------------------------------------------------------


def test_error_grows_with_sparsity_and_double_lora_reduces_it():
    weight = pretrained_like(96, 64)
    grad_output = grad_with_columns(128, 96)
    exact = grad_output @ weight
    errors = {
        (rank, sparsity): relative_error(linear_input_grad(weight, grad_output, sparsity, rank)[0], exact)
        for rank in (0, 8)
        for sparsity in (0.25, 0.5, 0.75)
    }
    for rank in (0, 8):
        assert 0 < errors[rank, 0.25] < 0.8 * errors[rank, 0.5] < 0.8 * errors[rank, 0.75], errors
    for sparsity in (0.25, 0.5, 0.75):
        assert errors[8, sparsity] < 0.3 * errors[0, sparsity], errors
    assert errors[0, 0.75] < 0.5  # the largest-score rows carry most of the product


def test_scores_pick_critical_rows_better_than_chance():
    weight = pretrained_like(96, 64)
    grad_output = grad_with_columns(128, 96)
    exact = grad_output @ weight
    for rank in (0, 8):
        got, approx = linear_input_grad(weight, grad_output, 0.5, rank)
        chosen = relative_error(got, exact)
        approx.index = torch.randperm(96, generator=torch.Generator().manual_seed(3))[: approx.kept_rows].sort()[0]
        approx.kept_residual = approx._gather_residual(weight, approx.index)
        x = torch.zeros(128, 64, requires_grad=True)
        ApproxLinearFunction.apply(x, weight, None, approx).backward(grad_output)
        assert chosen < 0.6 * relative_error(x.grad, exact), rank


def test_experts_error_per_expert_and_double_lora():
    stack = torch.stack([pretrained_like(48, 32, seed=s) for s in range(4)])
    grad_output = grad_with_columns(60, 48)
    offsets = torch.tensor([20, 20, 45, 60], dtype=torch.int32)
    exact = grouped_linear_reference(grad_output, stack.transpose(1, 2), offsets)
    errors = {}
    for rank in (0, 8):
        for sparsity in (0.25, 0.5):
            approx = RowSampledInputGrad(stack, sparsity, rank, refresh_steps=10, adaptive=False)
            x = torch.zeros(60, 32, requires_grad=True)
            ApproxGroupedLinearFunction.apply(x, stack, offsets, approx).backward(grad_output)
            errors[rank, sparsity] = relative_error(x.grad, exact)
            assert approx.index.shape == (4, approx.kept_rows)
    assert errors[0, 0.25] < errors[0, 0.5] and errors[8, 0.25] < errors[8, 0.5], errors
    assert errors[8, 0.5] < 0.2 * errors[0, 0.5], errors


def test_each_expert_keeps_its_own_important_rows():
    stack = torch.ones(3, 16, 8)
    offsets = torch.tensor([4, 4, 10], dtype=torch.int32)
    grad_output = torch.zeros(10, 16)
    grad_output[:4, 8:] = 1.0  # expert 0: gradient only in rows 8..15
    grad_output[4:, :8] = 1.0  # expert 2: only in rows 0..7
    approx = RowSampledInputGrad(stack, 0.5, 0, refresh_steps=10, adaptive=False)
    x = torch.zeros(10, 8, requires_grad=True)
    ApproxGroupedLinearFunction.apply(x, stack, offsets, approx).backward(grad_output)
    assert approx.index[0].tolist() == list(range(8, 16)) and approx.index[2].tolist() == list(range(8))
    torch.testing.assert_close(x.grad, grad_output @ stack[0])  # nothing with gradient was dropped


def test_adaptive_sparsity_keeps_fewer_rows_where_importance_is_concentrated():
    uniform = torch.ones(64)
    concentrated = torch.cat([torch.full((8,), 100.0), torch.ones(56)])
    assert adaptive_row_count(uniform, 0.5, kept_row_count(64, 0.5)) == 32
    assert adaptive_row_count(concentrated, 0.5, kept_row_count(64, 0.5)) == 8
    assert adaptive_row_count(torch.stack([uniform, concentrated]), 0.5, 32) == 32  # a stack: the most any needs

    weight = pretrained_like(96, 64)
    grad_output = grad_with_columns(128, 96)
    exact = grad_output @ weight
    fixed, fixed_approx = linear_input_grad(weight, grad_output, 0.5, 8, adaptive=False)
    adaptive, adaptive_approx = linear_input_grad(weight, grad_output, 0.5, 8, adaptive=True)
    assert adaptive_approx.kept_rows < fixed_approx.kept_rows == 48
    assert relative_error(adaptive, exact) < 0.2  # still a close gradient


# ----- a real saving: dense GEMMs over the kept rows -------------------------------------------------------------


class MatmulShapes(TorchDispatchMode):
    """Records (op, operand shapes) of every matrix product run inside it."""

    OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "_grouped_mm"}

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.OPS:
            self.calls.append((name, [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))

    def multiply_adds(self) -> int:
        total = 0
        for name, shapes in self.calls:
            a, b = shapes[:2] if name == "_grouped_mm" else shapes[-2:]
            total += a[0] * a[1] * b[-1]
        return total


def test_linear_backward_multiplies_only_kept_rows():
    weight = pretrained_like(256, 128)
    approx = RowSampledInputGrad(weight, 0.75, 16, refresh_steps=100, adaptive=False)
    x = torch.randn(64, 128, requires_grad=True)
    ApproxLinearFunction.apply(x, weight, None, approx).backward(torch.randn(64, 256))  # the refresh step
    assert approx.kept_residual.shape == (64, 128) and approx.kept_residual.is_contiguous()
    x.grad = None
    y = ApproxLinearFunction.apply(x, weight, None, approx)
    with MatmulShapes() as shapes:
        y.backward(torch.randn(64, 256))
    assert sorted(s for _, s in shapes.calls) == sorted([
        [(64, 64), (64, 128)],  # dY[:, S] @ R[S, :]: k = 64 of 256 rows
        [(64, 256), (256, 16)],  # dY @ B0
        [(64, 128), (64, 16), (16, 128)],  # += (dY B0) @ A0
    ])
    assert shapes.multiply_adds() == 64 * (64 * 128 + 256 * 16 + 16 * 128)
    assert shapes.multiply_adds() < 0.45 * 64 * 256 * 128  # the exact dX: N x out x in


def test_expert_backward_runs_grouped_gemms_over_kept_rows():
    stack = torch.randn(4, 64, 32)
    offsets = torch.tensor([10, 30, 30, 50], dtype=torch.int32)
    approx = RowSampledInputGrad(stack, 0.75, 8, refresh_steps=100, adaptive=False)
    x = torch.randn(50, 32, requires_grad=True)
    ApproxGroupedLinearFunction.apply(x, stack, offsets, approx).backward(torch.randn(50, 64))
    y = ApproxGroupedLinearFunction.apply(x, stack, offsets, approx)
    with MatmulShapes() as shapes:
        y.backward(torch.randn(50, 64))
    assert approx.kept_residual.shape == (4, 16, 32)
    products = sorted(s for name, s in shapes.calls if name == "_grouped_mm")
    assert products == sorted([
        [(50, 16), (4, 16, 32), (4,)],  # dY_e[:, S_e] @ R_e[S_e, :]
        [(50, 64), (4, 64, 8), (4,)],  # dY_e @ B0_e
        [(50, 8), (4, 8, 32), (4,)],  # (dY_e B0_e) @ A0_e
    ]), shapes.calls


# ----- the selection schedule ------------------------------------------------------------------------------------


def test_rows_are_chosen_every_refresh_steps_from_the_current_gradient():
    weight = torch.ones(32, 8)
    approx = RowSampledInputGrad(weight, 0.75, 0, refresh_steps=3, adaptive=False)
    chosen = []
    for step in range(7):
        grad_output = torch.zeros(4, 32)
        grad_output[:, 8 * (step % 4): 8 * (step % 4) + 8] = 1.0  # the important rows move every step
        x = torch.zeros(4, 8, requires_grad=True)
        ApproxLinearFunction.apply(x, weight, None, approx).backward(grad_output)
        chosen.append(approx.index[0].item())
    # Refreshed at passes 0, 3, 6 from that pass's dY, kept in between.
    assert chosen == [0, 0, 0, 24, 24, 24, 16]


def test_no_backward_work_without_grad():
    torch.manual_seed(0)
    layer = CeLoraLinear(nn.Linear(32, 32, bias=False), r=4, alpha=8)
    layer.approximate(0.5, 8, 10, False)
    with torch.no_grad():
        layer(torch.randn(2, 32))
    assert layer.approx.backward_passes == 0 and layer.approx.index is None


# ----- settings, YAML keys, saving ---------------------------------------------------------------------------------


def test_sparsity_per_module_follows_the_target_name_rules():
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_config())
    ce = CeLoraSettings(sparsity={"v_proj": 0.5, "o_proj": 0.75, "experts.down_proj": 0.5, "down_proj": 0.25})
    apply_ce_lora(model, ALL, ce)
    kept = {name: (a.kept_rows, a.out_features) for name, a in approximated_modules(model).items()}
    assert kept["model.layers.0.self_attn.v_proj"] == (16, 32)
    assert kept["model.layers.0.self_attn.o_proj"] == (16, 64)
    assert kept["model.layers.1.mlp.experts.down_proj"] == (32, 64)
    assert kept["model.layers.0.mlp.down_proj"] == (48, 64)  # the dense MLP: 'down_proj' (never the experts')
    assert "model.layers.0.self_attn.q_proj" not in kept  # no entry: exact, as in the authors' scripts
    assert "model.layers.1.mlp.experts.gate_up_proj" not in kept
    with pytest.raises(LoraTargetError, match="'gate_up_proj' matches no adapted module"):
        apply_ce_lora(KimiLinearForCausalLM(tiny_config()), ALL, CeLoraSettings(sparsity={"gate_up_proj": 0.5}))


def test_double_rank_default_and_rounding():
    assert CeLoraSettings().double_rank_for(16) == 14  # the authors' 7/8 of lora_r
    approx = RowSampledInputGrad(torch.randn(64, 48), 0.5, 14, refresh_steps=1, adaptive=False)
    assert approx.double_rank == 16 and approx.a0.shape == (16, 48) and approx.b0.shape == (64, 16)
    assert RowSampledInputGrad(torch.randn(64, 12), 0.5, 14, 1, False).double_rank == 12  # at most min(out, in)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"ce_lora_sparsity must be a number in \[0, 1\)"),
        ({"sparsity": {"q_proj": -0.1}}, r"ce_lora_sparsity\['q_proj'\] must be"),
        ({"double_rank": -1}, "ce_lora_double_rank must be a non-negative integer"),
        ({"refresh_steps": 0}, "ce_lora_refresh_steps must be a positive integer"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CeLoraSettings(**kwargs)


def test_yaml_keys():
    base = {"init_from_config": "examples/models/tiny.json", "tokenizer": "examples/tokenizer",
            "lora_target_linear": True}
    config, _ = parse_config(base | {"adapter": "ce_lora", "ce_lora_sparsity": {"v_proj": 0.4},
                                     "ce_lora_refresh_steps": 50, "ce_lora_adaptive": True})
    ce = ce_lora_settings(config)
    assert ce.sparsity == {"v_proj": 0.4} and ce.refresh_steps == 50 and ce.adaptive and ce.double_rank is None
    assert ce_lora_settings(parse_config(base | {"adapter": "ce_lora"})[0]).sparsity == 0.5
    with pytest.raises(ConfigError, match="ce_lora_sparsity only apply with adapter: ce_lora"):
        parse_config(base | {"adapter": "lora", "ce_lora_sparsity": 0.3})
    with pytest.raises(ConfigError, match=r"ce_lora_sparsity\['o_proj'\] must be in \[0, 1\)"):
        parse_config(base | {"adapter": "ce_lora", "ce_lora_sparsity": {"o_proj": 1.5}})
    with pytest.raises(ConfigError, match="ce_lora_refresh_steps"):
        parse_config(base | {"adapter": "ce_lora", "ce_lora_refresh_steps": 0})


def test_saved_adapter_is_plain_lora(tmp_path, input_ids):
    torch.manual_seed(0)
    ce_model = KimiLinearForCausalLM(tiny_config())
    state = ce_model.state_dict()
    apply_ce_lora(ce_model, ALL, CeLoraSettings(sparsity=0.5))
    randomize_lora(ce_model)
    ce_model(input_ids, labels=input_ids).loss.backward()  # buffers filled by a backward
    assert set(ce_model.state_dict()) == set(state) | set(lora_state_dict(ce_model))  # no CE-LoRA buffers
    save_adapter(ce_model, tmp_path, ALL)

    plain = KimiLinearForCausalLM(tiny_config())
    plain.load_state_dict(state)
    load_adapter(plain, tmp_path)
    assert not any(isinstance(m, CeLoraLinear) for m in plain.modules())
    ce_model.eval(), plain.eval()
    with torch.no_grad():
        # plain LoRA's linears join (model/projections.py), CE-LoRA's run one by one: equal up to the order of sums
        torch.testing.assert_close(plain(input_ids).logits, ce_model(input_ids).logits, rtol=1e-5, atol=1e-5)


def test_model_gradients_are_close_to_lora_and_finite():
    lora, ce_model = model_pair(CeLoraSettings(sparsity=0.5, double_rank=8))
    ids = token_ids(seed=3)
    expected, got = lora_grads(lora, ids), lora_grads(ce_model, ids)
    for name in expected:
        assert torch.isfinite(got[name]).all(), name
    flat_expected = torch.cat([g.flatten() for g in expected.values()])
    flat_got = torch.cat([g.flatten() for g in got.values()])
    cosine = torch.nn.functional.cosine_similarity(flat_got, flat_expected, dim=0)
    assert cosine > 0.9  # random weights (flat spectra) are the hardest case for the approximation
