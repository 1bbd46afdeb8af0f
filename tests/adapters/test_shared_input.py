"""kimitune.model.projections with LoRA's hook (ops.shared_input_lora): adapted linears of one input computed together give the numbers of the linears
run one by one (outputs, input gradient, every adapter's gradients), and fall back to one by one when they cannot
join."""

from __future__ import annotations

import pytest
import torch
from adapter_helpers import randomize_lora, tiny_config, token_ids
from torch import nn

from kimitune import KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, lora_modules
from kimitune.adapters.ce_lora import CeLoraLinear
from kimitune.adapters.layers import LoraLinear
from kimitune.model.projections import project_shared_input
from kimitune.ops.shared_input_lora import SharedInputLora

IN = 24
OUTS = (16, 12, 16, 4, 8)  # q, k, v (one buffer), then two alone


def linears(dtype=torch.float32, dropout=0.0, cls=LoraLinear, bias=False, seed=0):
    torch.manual_seed(seed)
    modules = []
    for out in OUTS:
        module = cls(nn.Linear(IN, out, bias=bias).to(dtype), r=4, alpha=8, dropout=dropout)
        module.weight.requires_grad_(False)
        if module.bias is not None:
            module.bias.requires_grad_(False)
        with torch.no_grad():
            module.lora_B.normal_()
        modules.append(module)
    return modules


def joining(modules, joined: bool):
    """The LoRA linears among ``modules`` built to join (the default) or to run one by one."""
    for m in modules:
        if isinstance(m, LoraLinear):
            m.join_shared_input = joined
    return modules


def outputs(modules):
    return (tuple(modules[:3]), modules[3], modules[4])


def run(modules, x, joined: bool, grads_of=(0, 1, 2)):
    """The outputs, x's gradient and the adapters' gradients, the linears joined or one by one."""
    for m in modules:
        m.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    ys = project_shared_input(x, *outputs(joining(modules, joined)))
    gen = torch.Generator().manual_seed(1)
    loss = sum((ys[i].float() * torch.randn(ys[i].shape, generator=gen).to(ys[i].device)).sum() for i in grads_of)
    loss.backward()
    adapter_grads = [(m.lora_A.grad, m.lora_B.grad) for m in modules]
    return ys, x.grad, adapter_grads


def assert_same(joined, alone, rtol, atol):
    """Equal within rtol, and atol times each tensor's largest magnitude (bf16 sums rounded in another order differ
    where they cancel)."""
    def close(got, expected):
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol * expected.abs().max().item())

    for a, b in zip(joined[0], alone[0]):
        close(a, b)
    close(joined[1], alone[1])
    for (ja, jb), (aa, ab) in zip(joined[2], alone[2]):
        for got, expected in ((ja, aa), (jb, ab)):
            if expected is None:
                assert got is None or not got.any()
            else:
                close(got, expected)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_joined_linears_give_the_numbers_of_the_linears_one_by_one(dtype, tol):
    modules = linears(dtype)
    x = torch.randn(2, 7, IN).to(dtype)
    joined, alone = run(modules, x, True), run(modules, x, False)
    assert [y.shape for y in joined[0]] == [(2, 7, 44), (2, 7, 4), (2, 7, 8)]
    assert_same(joined, alone, tol, tol)


def test_an_unused_output_gives_its_adapters_no_gradient():
    modules = linears()
    x = torch.randn(5, IN)
    joined, alone = run(modules, x, True, grads_of=(0, 2)), run(modules, x, False, grads_of=(0, 2))
    assert_same(joined, alone, 1e-5, 1e-6)
    assert alone[2][3][1] is None  # the unused linear's lora_B


def test_the_linears_join_in_one_autograd_node(monkeypatch):
    calls = []
    original = SharedInputLora.apply
    monkeypatch.setattr(SharedInputLora, "apply", lambda *args: calls.append(1) or original(*args))
    project_shared_input(torch.randn(3, IN), *outputs(linears()))
    assert calls == [1]


@pytest.mark.parametrize("case", ["dropout", "ce-lora", "bias", "plain linear", "trainable weight", "autocast"])
def test_linears_that_cannot_join_run_one_by_one(case, monkeypatch):
    # A LoraLinear that can join runs alone through the same node: no call may hold more than one linear.
    linears_per_call = []
    original = SharedInputLora.apply
    monkeypatch.setattr(SharedInputLora, "apply",
                        lambda *args: linears_per_call.append(sum(args[2])) or original(*args))
    modules = linears(dropout=0.1 if case == "dropout" else 0.0, cls=CeLoraLinear if case == "ce-lora" else LoraLinear,
                      bias=case == "bias")
    if case == "plain linear":
        modules[4] = nn.Linear(IN, OUTS[4], bias=False)
    if case == "dropout":  # in eval, so that both runs draw no mask; the module is still a Dropout
        modules = [m.eval() for m in modules]
    if case == "trainable weight":
        modules[0].weight.requires_grad_(True)
    x = torch.randn(3, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        ys = project_shared_input(x, *outputs(modules))
        expected = (torch.cat([m(x) for m in modules[:3]], -1), modules[3](x), modules[4](x))
    for y, e in zip(ys, expected):
        torch.testing.assert_close(y, e)
    assert set(linears_per_call) <= {1}


def test_model_loss_and_adapter_gradients_match_the_linears_one_by_one(monkeypatch):
    ids = token_ids()
    results = []
    for joined in (True, False):
        torch.manual_seed(0)
        model = KimiLinearForCausalLM(tiny_config()).train()
        apply_lora(model, LoraSettings(r=4, alpha=8, target_modules="all-linear", join_shared_input=joined))
        randomize_lora(model)
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {name: (m.lora_A.grad, m.lora_B.grad) for name, m in lora_modules(model).items()}))
    (loss_joined, grads_joined), (loss_alone, grads_alone) = results
    torch.testing.assert_close(loss_joined, loss_alone, rtol=1e-6, atol=1e-6)
    assert grads_joined.keys() == grads_alone.keys()
    for name in grads_alone:
        for got, expected in zip(grads_joined[name], grads_alone[name]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_joined_linears_match_one_by_one():
    modules = [m.cuda() for m in linears(torch.bfloat16)]
    x = torch.randn(4096, IN, device="cuda", dtype=torch.bfloat16)
    assert_same(run(modules, x, True), run(modules, x, False), 1e-2, 1e-2)


def test_a_linear_alone_runs_through_the_node_with_the_numbers_of_its_own_path(monkeypatch):
    module = linears()[0]
    x = torch.randn(6, IN)
    results = []
    for join in (True, False):
        joining([module], join)
        module.zero_grad(set_to_none=True)
        x_grad = x.clone().requires_grad_(True)
        y = module(x_grad)
        y.backward(torch.ones_like(y))
        results.append((y.detach(), x_grad.grad, module.lora_A.grad, module.lora_B.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
