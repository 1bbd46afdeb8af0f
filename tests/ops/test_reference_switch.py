"""kimitune.ops.force_reference / KIMITUNE_REFERENCE_OPS: every dispatcher of kimitune.ops takes its PyTorch
reference path with the switch on, also for CUDA tensors.

Without a GPU, the dispatchers get CPU tensors that say they are on CUDA (fake_cuda.py), and their kernel entry
points are replaced by stand-ins that raise. Each case is checked both ways: with the switch off the CUDA-looking
inputs reach a kernel (so the case does exercise the dispatch), with it on the reference runs and gives what the
CPU path gives. On a GPU the same cases run on CUDA tensors with the switch on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
from fake_cuda import cuda_looking

import kimitune.ops as ops
from kimitune.ops import attention, expert_combine, expert_swiglu, grouped_mm, loss, norm, permute, reference_switch
from kimitune.ops import router, softmax_grad
from kimitune.ops.kda import fla as fla_backend
from kimitune.ops.permute import inverse_permutation


class KernelCalled(Exception):
    pass


def kernel(name: str) -> Callable:
    def stand_in(*args, **kwargs):
        raise KernelCalled(name)
    return stand_in


@pytest.fixture(autouse=True)
def restore_switch():
    saved = reference_switch._forced
    yield
    reference_switch._forced = saved


@dataclass
class Case:
    """``run(mode)`` calls the dispatcher on fresh inputs: CPU tensors ("cpu"), CPU tensors that look like CUDA
    tensors ("fake") or CUDA tensors ("cuda"); ``kernels`` replaces its kernel entry points; ``reference`` is
    (module, name) of the reference it must call with the switch on."""

    name: str
    run: Callable[[str], object]
    kernels: Callable[[pytest.MonkeyPatch], None]
    reference: tuple[object, str]


def _inputs(*shapes, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen).to(dtype) for shape in shapes]


def _place(mode: str, *tensors):
    """The dispatcher's own inputs for ``mode``."""
    if mode == "fake":
        return [cuda_looking(t) for t in tensors]
    return [t.cuda() if mode == "cuda" else t for t in tensors]


def _aux(mode: str, t: torch.Tensor) -> torch.Tensor:
    """An index or target tensor: on the GPU with CUDA inputs, else as it is."""
    return t.cuda() if mode == "cuda" else t


def _kda(mode: str, fn):
    q, k, v, g = _inputs((1, 10, 2, 4), (1, 10, 2, 4), (1, 10, 2, 3), (1, 10, 2, 4))
    beta = torch.rand(1, 10, 2, generator=torch.Generator().manual_seed(1))
    cu = torch.tensor([0, 4, 10])
    q, k, v, g, beta = _place(mode, q, k, v, -g.abs(), beta)
    return fn(q, k, v, g, beta, output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu)


def _conv(mode: str, **kwargs):
    x, weight, bias = _inputs((1, 12, 6), (6, 4), (6,))
    x, weight = _place(mode, x, weight)
    if kwargs.pop("with_bias", False):
        kwargs["bias"] = _aux(mode, bias)
    return ops.causal_conv1d(x, weight, **kwargs)


def _conv_update(mode: str):
    x, state, weight = _inputs((2, 6), (2, 6, 4), (6, 4))
    x, state, weight = _place(mode, x, state, weight)
    return ops.causal_conv1d_update(x, state, weight, activation="silu")


def _attention(mode: str):
    q, k, v = _inputs((1, 2, 9, 8), (1, 2, 9, 8), (1, 2, 9, 4), dtype=torch.bfloat16)
    q, k, v = _place(mode, q, k, v)
    return attention.packed_causal_attention(q, k, v, torch.tensor([0, 5, 9]), 0.5)


def _norms(monkeypatch):
    fused = SimpleNamespace(rms_norm=kernel("fla rms_norm"), rms_norm_gated=kernel("fla rms_norm_gated"),
                            swiglu=kernel("fla swiglu"))
    monkeypatch.setattr(norm, "_fla_modules", lambda: fused)


def _rows(tokens=5, k=3, width=16):
    gen = torch.Generator().manual_seed(0)
    order = torch.argsort(torch.randint(0, 4, (tokens * k,), generator=gen), stable=True)
    return torch.randn(tokens * k, width, generator=gen), order, inverse_permutation(order), k


def _combine_rows(mode: str):
    rows, order, inverse, k = _rows()
    (rows,) = _place(mode, rows.requires_grad_())
    return permute.combine_rows(rows, _aux(mode, order), _aux(mode, inverse), k)


def _sum_copies(mode: str):
    rows, _, inverse, k = _rows()
    (rows,) = _place(mode, rows)
    return expert_combine.sum_token_copies(rows, _aux(mode, inverse), k)


def _expert_swiglu(mode: str):
    gate_up, weights = _inputs((6, 10), (6,))
    gate_up, weights = _place(mode, gate_up, weights.abs())
    return expert_swiglu.expert_swiglu(gate_up, weights)


def _softmax_grad(mode: str):
    (logits,) = _inputs((4, 50))
    (logits,) = _place(mode, logits)
    stats = softmax_grad.softmax_grad_(logits, _aux(mode, torch.tensor([0, 7, 49, 3])), scale=0.5)
    return stats, logits  # the gradient is written over the logits


def _loss(mode: str):
    hidden, weight = _inputs((6, 8), (40, 8))
    (hidden,) = _place(mode, hidden)
    targets = _aux(mode, torch.tensor([1, -100, 3, 39, 0, 5]))
    # "cce" refuses CPU tensors, so the CPU result to match is the fused loss's.
    return loss.linear_cross_entropy(hidden, _aux(mode, weight), targets, impl="fused" if mode == "cpu" else "cce")


def _router(mode: str):
    x, weight = _inputs((5, 8), (4, 8), dtype=torch.bfloat16)
    x, weight = _place(mode, x, weight)
    return router.router_logits(x, weight)


def _grouped(mode: str):
    # torch._grouped_mm also runs on the CPU (float32, 16-byte rows), so the CPU tensors themselves dispatch to it.
    x, weight = _place(mode, *_inputs((7, 8), (3, 4, 8)))
    return grouped_mm.grouped_linear(x, weight, _aux(mode, torch.tensor([2, 2, 7], dtype=torch.int32)))


CASES = [
    Case("chunk_kda", lambda mode: _kda(mode, ops.chunk_kda),
         lambda mp: mp.setattr(fla_backend, "chunk_kda", kernel("fla chunk_kda")), (ops, "chunk_kda_reference")),
    Case("fused_recurrent_kda", lambda mode: _kda(mode, ops.fused_recurrent_kda),
         lambda mp: mp.setattr(fla_backend, "fused_recurrent_kda", kernel("fla fused_recurrent_kda")),
         (ops, "fused_recurrent_kda_reference")),
    Case("causal_conv1d, training case", lambda mode: _conv(mode, activation="silu", parts=3),
         lambda mp: mp.setattr(ops, "conv_silu", kernel("conv_silu")), (ops, "causal_conv1d_reference")),
    Case("causal_conv1d, bias and state", lambda mode: _conv(mode, with_bias=True, output_final_state=True),
         lambda mp: mp.setattr(fla_backend, "causal_conv1d", kernel("fla causal_conv1d")),
         (ops, "causal_conv1d_reference")),
    Case("causal_conv1d_update", _conv_update,
         lambda mp: mp.setattr(fla_backend, "causal_conv1d_update", kernel("fla causal_conv1d_update")),
         (ops, "causal_conv1d_update_reference")),
    Case("packed_causal_attention", _attention,
         lambda mp: mp.setattr(attention, "_varlen_attn", lambda: kernel("varlen_attn")),
         (attention, "packed_causal_attention_reference")),
    Case("rms_norm", lambda mode: norm.rms_norm(*_place(mode, *_inputs((3, 8), (8,))), 1e-5), _norms,
         (norm, "rms_norm_reference")),
    Case("gated_rms_norm", lambda mode: norm.gated_rms_norm(*_place(mode, *_inputs((3, 8), (3, 8), (8,))), 1e-5),
         _norms, (norm, "gated_rms_norm_reference")),
    Case("swiglu", lambda mode: norm.swiglu(*_place(mode, *_inputs((3, 8), (3, 8)))), _norms,
         (norm, "swiglu_reference")),
    Case("expert_swiglu", _expert_swiglu,
         lambda mp: mp.setattr(expert_swiglu, "expert_swiglu_forward_triton", kernel("expert_swiglu forward")),
         (expert_swiglu, "expert_swiglu_reference")),
    Case("sum_token_copies", _sum_copies,
         lambda mp: mp.setattr(expert_combine, "sum_token_copies_triton", kernel("sum_token_copies")),
         (expert_combine, "sum_token_copies_reference")),
    Case("combine_rows", _combine_rows,
         lambda mp: mp.setattr(expert_combine, "sum_token_copies_triton", kernel("sum_token_copies")),
         (expert_combine, "sum_token_copies_reference")),
    Case("softmax_grad_", _softmax_grad,
         lambda mp: mp.setattr(softmax_grad, "softmax_grad_triton_", kernel("softmax_grad")),
         (softmax_grad, "softmax_grad_reference_")),
    Case("linear_cross_entropy, impl='cce'", _loss,
         lambda mp: mp.setattr(loss, "_cut_cross_entropy", kernel("cut-cross-entropy")),
         (loss, "chunked_linear_cross_entropy")),
    Case("router_logits", _router,
         lambda mp: mp.setattr(router, "_RouterLogits", SimpleNamespace(apply=kernel("router tensor cores"))),
         (router, "router_logits_reference")),
    Case("grouped_linear", _grouped,
         lambda mp: mp.setattr(torch, "_grouped_mm", kernel("torch._grouped_mm")),
         (grouped_mm, "grouped_linear_reference")),
]


def _flatten(result) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result.as_subclass(torch.Tensor)]
    if result is None:
        return []
    return [t for item in result for t in _flatten(item)]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_without_the_switch_cuda_tensors_reach_a_kernel(case, monkeypatch):
    case.kernels(monkeypatch)
    with ops.force_reference(False), pytest.raises(KernelCalled):
        case.run("fake")


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_with_the_switch_cuda_tensors_take_the_reference(case, monkeypatch):
    expected = _flatten(case.run("cpu"))  # CPU tensors: the reference path whatever the switch
    case.kernels(monkeypatch)
    module, name = case.reference
    calls = []
    reference = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return reference(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    with ops.force_reference():
        got = _flatten(case.run("fake"))
    assert calls, f"{case.name} did not call {name}"
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_with_the_switch_cuda_tensors_take_the_reference_on_a_gpu(case, monkeypatch):
    expected = _flatten(case.run("cpu"))
    case.kernels(monkeypatch)
    with ops.force_reference():
        got = _flatten(case.run("cuda"))
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.is_cuda
        tol = 2e-2 if b.dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol)


def test_a_call_sets_the_switch_and_a_block_restores_it():
    ops.force_reference(False)
    assert not ops.reference_forced()
    with ops.force_reference():
        assert ops.reference_forced()
        with ops.force_reference(False):
            assert not ops.reference_forced()
        assert ops.reference_forced()
    assert not ops.reference_forced()
    ops.force_reference(True)
    assert ops.reference_forced()


def test_the_environment_is_read_once_at_import(monkeypatch):
    before = ops.reference_forced()
    monkeypatch.setenv(reference_switch.ENV_VAR, "0" if before else "1")
    assert ops.reference_forced() == before


def _python(code: str, value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != reference_switch.ENV_VAR}
    if value is not None:
        env[reference_switch.ENV_VAR] = value
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


ENV_CHECK = """
import torch
from fake_cuda import cuda_looking
import kimitune.ops as ops
from kimitune.ops import expert_combine

def kernel(*args):
    raise RuntimeError("the kernel ran")

expert_combine.sum_token_copies_triton = kernel
rows = cuda_looking(torch.arange(12.0).view(6, 2))
try:
    y = expert_combine.sum_token_copies(rows, torch.arange(6), 2)
except RuntimeError:
    print(ops.reference_forced(), "kernel")
else:
    print(ops.reference_forced(), y.tolist())
"""


def test_the_environment_variable_forces_the_references_from_import():
    run = _python(ENV_CHECK, "1")
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "True [[2.0, 4.0], [10.0, 12.0], [18.0, 20.0]]"


@pytest.mark.parametrize("value, forced", [("1", True), ("true", True), (" ON ", True), ("yes", True), ("0", False),
                                           ("", False), ("off", False), (None, False)])
def test_values_of_the_environment_variable(value, forced, monkeypatch):
    if value is None:
        monkeypatch.delenv(reference_switch.ENV_VAR, raising=False)
    else:
        monkeypatch.setenv(reference_switch.ENV_VAR, value)
    assert reference_switch._from_environment() is forced


def test_an_unknown_value_of_the_environment_variable_is_refused(monkeypatch):
    monkeypatch.setenv(reference_switch.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="KIMITUNE_REFERENCE_OPS='maybe'"):
        reference_switch._from_environment()
