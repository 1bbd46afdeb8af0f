"""On a CUDA GPU with fla-core: the fla path (kimitune.ops on CUDA tensors) against the project's PyTorch path on
the same GPU, within bf16 tolerance, for outputs, final states and gradients, packed sequences included.

Run on the device: python -m pytest -q tests/ops/test_kda_gpu.py -m gpu
"""

from __future__ import annotations

import pytest
import torch

from kimitune.ops import causal_conv1d, causal_conv1d_update, chunk_kda, fused_recurrent_kda
from kimitune.ops.conv import causal_conv1d_reference, causal_conv1d_update_reference
from kimitune.ops.kda.chunk import chunk_kda_reference
from kimitune.ops.kda.recurrent import fused_recurrent_kda_reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (and fla-core)"),
]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dg", "dbeta", "dh0"]
# RMS-relative tolerances: fla's own fp16 tests use 0.005-0.02; bf16 keeps 3 fewer mantissa bits.
TOLERANCE = {"o": 2e-2, "final_state": 2e-2, "dq": 2e-2, "dk": 2e-2, "dv": 2e-2, "dg": 4e-2, "dbeta": 4e-2,
             "dh0": 2e-2}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64 (fla's own tests use this kind of ratio for bf16 kernels)."""
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def kda_inputs(T, H=4, K=64, V=64, N=1, max_decay=1.0, seed=0):
    """bf16 q, k, v, g, beta [1, T, ...] on the GPU with realistic gates, and float32 initial states [N, ...]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, H, K, device="cuda", generator=gen)
    k = torch.randn(1, T, H, K, device="cuda", generator=gen)
    v = torch.randn(1, T, H, V, device="cuda", generator=gen)
    g = -max_decay * torch.rand(1, T, H, K, device="cuda", generator=gen)
    beta = torch.rand(1, T, H, device="cuda", generator=gen).sigmoid()
    h0 = torch.randn(N, H, K, V, device="cuda", generator=gen) * 0.1
    return [x.bfloat16() for x in (q, k, v, g, beta)] + [h0]


def run(fn, inputs, cu_seqlens, with_grads=True):
    leaves = [x.detach().clone().requires_grad_(with_grads) for x in inputs]
    q, k, v, g, beta, h0 = leaves
    o, final = fn(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True,
                  cu_seqlens=cu_seqlens)
    if not with_grads:
        return [o, final]
    gen = torch.Generator(device="cuda").manual_seed(123)
    loss = (o.float() * torch.randn(o.shape, device="cuda", generator=gen)).sum()
    loss = loss + (final * torch.randn(final.shape, device="cuda", generator=gen)).sum()
    loss.backward()
    return [o, final] + [x.grad for x in leaves]


@pytest.mark.parametrize("cu_on_host", [True, False])
@pytest.mark.parametrize("max_decay", [1.0, 8.0])
def test_chunk_kda_fla_matches_pytorch_path(cu_on_host, max_decay):
    lens = [1, 300, 64, 129, 7]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    if not cu_on_host:
        cu = cu.cuda()
    inputs = kda_inputs(sum(lens), N=len(lens), max_decay=max_decay)
    fla_out = run(chunk_kda, inputs, cu)
    torch_out = run(chunk_kda_reference, inputs, cu)
    for name, a, b in zip(NAMES, fla_out, torch_out):
        assert a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        assert relative_error(a, b) < TOLERANCE[name], f"{name}: relative error {relative_error(a, b):.3g}"


def test_chunk_kda_fla_matches_pytorch_path_unpacked():
    inputs = kda_inputs(2 * 200, N=2)
    batched = [x.view(2, 200, *x.shape[2:]) for x in inputs[:5]] + [inputs[5]]
    for name, a, b in zip(NAMES, run(chunk_kda, batched, None), run(chunk_kda_reference, batched, None)):
        assert relative_error(a, b) < TOLERANCE[name], f"{name}: relative error {relative_error(a, b):.3g}"


def test_chunk_kda_gate_in_fla_kernel_matches_precomputed_decay():
    """With A_log and dt_bias fla computes the decay in its kernel (use_gate_in_kernel): the same output and
    gradients as the decay precomputed by kda_decay, packed sequences included."""
    from kimitune.ops import kda_decay

    lens = [3, 300, 129]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    q, k, v, _, beta, h0 = kda_inputs(sum(lens), N=len(lens))
    gen = torch.Generator(device="cuda").manual_seed(5)
    f = torch.randn(q.shape, device="cuda", generator=gen).bfloat16()
    A_log = torch.empty(4, device="cuda").uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(4 * 64, device="cuda", generator=gen) - 3

    def gated(in_kernel):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, f, beta, A_log, dt_bias)]
        q_, k_, v_, f_, beta_, a_, b_ = leaves
        if in_kernel:
            o, _ = chunk_kda(q_, k_, v_, f_, beta_, initial_state=h0, use_qk_l2norm_in_kernel=True, cu_seqlens=cu,
                             A_log=a_, dt_bias=b_)
        else:
            o, _ = chunk_kda(q_, k_, v_, kda_decay(f_, a_, b_), beta_, initial_state=h0,
                             use_qk_l2norm_in_kernel=True, cu_seqlens=cu)
        (o.float() * torch.randn(o.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(9))).sum().backward()
        return [o] + [t.grad for t in leaves]

    names = ["o", "dq", "dk", "dv", "df", "dbeta", "dA_log", "ddt_bias"]
    for name, a, b in zip(names, gated(True), gated(False)):
        assert a.shape == b.shape and torch.isfinite(a).all(), name
        assert relative_error(a, b) < 2e-2, f"{name}: relative error {relative_error(a, b):.3g}"


def test_chunk_kda_keeping_intermediates_gives_the_same_outputs_and_gradients():
    """fla's disable_recompute (keep_intermediates) saves what the backward would recompute: same results."""
    inputs = kda_inputs(T=200, N=3)
    cu_seqlens = torch.tensor([0, 50, 130, 200])
    plain = run(chunk_kda, inputs, cu_seqlens)
    kept = run(lambda *a, **kw: chunk_kda(*a, **kw, keep_intermediates=True), inputs, cu_seqlens)
    for name, got, ref in zip(NAMES, kept, plain):
        assert relative_error(got, ref) < 1e-2, name


def test_fused_recurrent_fla_matches_pytorch_path_packed_decode():
    N = 3
    inputs = kda_inputs(N, N=N, seed=1)  # one token per sequence: a decode step
    cu = torch.arange(N + 1, dtype=torch.int32)
    for a, b in zip(run(fused_recurrent_kda, inputs, cu, with_grads=False),
                    run(fused_recurrent_kda_reference, inputs, cu, with_grads=False)):
        assert relative_error(a, b) < 2e-2


def test_causal_conv1d_fla_matches_pytorch_path():
    lens = [1, 2, 100, 37]
    cu = torch.tensor([0, *lens]).cumsum(0).to(torch.int32)
    gen = torch.Generator(device="cuda").manual_seed(2)
    D, W = 192, 4
    x = torch.randn(1, sum(lens), D, device="cuda", generator=gen).bfloat16()
    weight = torch.randn(D, W, device="cuda", generator=gen).bfloat16()
    h0 = torch.randn(len(lens), D, W, device="cuda", generator=gen).bfloat16()

    def run_conv(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, h0)]
        y, final = fn(leaves[0], leaves[1], None, "silu", initial_state=leaves[2], output_final_state=True,
                      cu_seqlens=cu)
        (y.float().square().sum() + final.float().sum()).backward()
        return [y, final] + [t.grad for t in leaves]

    for a, b in zip(run_conv(causal_conv1d), run_conv(causal_conv1d_reference)):
        assert relative_error(a, b) < 2e-2

    state_fla, state_torch = h0.clone(), h0.clone()
    y_fla, returned = causal_conv1d_update(x[0, :4], state_fla, weight, None, "silu")
    y_torch, _ = causal_conv1d_update_reference(x[0, :4], state_torch, weight, None, "silu")
    assert returned.data_ptr() == state_fla.data_ptr()
    assert relative_error(y_fla, y_torch) < 2e-2 and torch.equal(state_fla, state_torch)
