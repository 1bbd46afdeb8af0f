"""prefix_attention (kimitune/ops/prefix_attention.py): a piece's causal attention over its own keys and earlier
tokens expanded block by block equals one masked attention over everything, outputs and every gradient (the
queries', the own keys' and values', the latents' and the expansion's weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kimitune.ops.prefix_attention import prefix_attention, prefix_attention_reference


def setup(seed=0, B=2, H=3, T=7, rank=8, rope=4, nope=12, v_dim=10, sizes=(5, 1, 9)):
    torch.manual_seed(seed)
    kv_b = nn.Linear(rank, H * (nope + v_dim), bias=False)

    def expand(latent, shared):
        kv = kv_b(latent).view(B, latent.shape[1], H, nope + v_dim).transpose(1, 2)
        k_nope, v = kv.split([nope, v_dim], dim=-1)
        return torch.cat([k_nope, shared[:, None].expand(-1, H, -1, -1)], dim=-1), v

    q = torch.randn(B, H, T, nope + rope, requires_grad=True)
    k = torch.randn(B, H, T, nope + rope, requires_grad=True)
    v = torch.randn(B, H, T, v_dim, requires_grad=True)
    blocks = [(torch.randn(B, n, rank, requires_grad=True), torch.randn(B, n, rope, requires_grad=True))
              for n in sizes]
    return kv_b, expand, q, k, v, blocks


@pytest.mark.parametrize("sizes", [(5, 1, 9), (), (4,)], ids=["three blocks", "no prefix", "one block"])
def test_blockwise_equals_one_masked_attention(sizes):
    kv_b, expand, q, k, v, blocks = setup(sizes=sizes)
    scale = 0.2
    leaves = [q, k, v, kv_b.weight] + [t for block in blocks for t in block]
    results = []
    for fn in (prefix_attention, prefix_attention_reference):
        out = fn(q, k, v, blocks, expand, [kv_b.weight], scale)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
        results.append((out.detach(), torch.autograd.grad(out, leaves, grad, materialize_grads=True)))
    (out, grads), (ref, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_a_gpu_route_named_leaves_cpu_tensors_on_the_cpu_route(backend, monkeypatch):
    from kimitune.ops import prefix_attention as module

    monkeypatch.setattr(module, "BACKEND", backend)
    kv_b, expand, q, k, v, blocks = setup()
    out = prefix_attention(q, k, v, blocks, expand, [kv_b.weight], 0.2)
    torch.testing.assert_close(out, prefix_attention_reference(q, k, v, blocks, expand, [kv_b.weight], 0.2),
                               rtol=1e-5, atol=1e-5)
    assert module._route(q) == "cpu" and module._value_width(q, v) == q.shape[-1]


@pytest.mark.parametrize("capability, expected", [((9, 0), "cudnn"), ((8, 0), "flash"), ((10, 0), "flash")])
def test_the_default_route_is_cudnn_on_hopper_only(capability, expected, monkeypatch):
    """cuDNN was measured faster on Hopper; other GPUs keep flash until measured there. A named route is taken as
    named, and a CPU device is always the CPU route."""
    from kimitune.ops import prefix_attention as module

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    module._cudnn_is_measured_on.cache_clear()  # a GPU's answer is kept: this test fakes three GPUs as device 0
    assert module.BACKEND == "auto"
    assert module.route(torch.device("cuda", 0)) == expected
    module._cudnn_is_measured_on.cache_clear()
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: False)  # a torch built without cuDNN
    assert module.route(torch.device("cuda", 0)) == "flash"
    module._cudnn_is_measured_on.cache_clear()
    assert module.route(torch.device("cpu")) == "cpu"
    for named in ("cudnn", "flash"):
        monkeypatch.setattr(module, "BACKEND", named)
        assert module.route(torch.device("cuda", 0)) == named


def test_only_one_block_is_expanded_at_a_time():
    """What autograd keeps: the queries, own keys and values, the output, its log-sum-exp and the latents; no
    expanded block."""
    kv_b, expand, q, k, v, blocks = setup(sizes=(50, 50))
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (sizes.append(t.shape), t)[1], lambda t: t):
        out = prefix_attention(q, k, v, blocks, expand, [kv_b.weight], 0.2)
    assert all(s[-2] != 50 or len(s) == 3 for s in sizes), sizes  # no [B, H, 50, D]: only latents [B, 50, R]
    out.sum().backward()
    assert kv_b.weight.grad is not None and blocks[0][0].grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["cudnn", "flash"])
def test_blockwise_on_the_gpu_matches_the_masked_reference_in_bf16(backend, monkeypatch):
    """Both GPU routes; the values (64 wide) narrower than the keys (96), as MLA's, and blocks of other lengths than
    the piece's."""
    from kimitune.ops import prefix_attention as module

    monkeypatch.setattr(module, "BACKEND", backend)
    kv_b, expand, q, k, v, blocks = setup(B=1, H=4, T=300, rank=64, rope=32, nope=64, v_dim=64, sizes=(256, 100))
    kv_b.cuda().bfloat16()
    move = lambda t: t.detach().cuda().bfloat16().requires_grad_()  # noqa: E731
    q, k, v = move(q), move(k), move(v)
    blocks = [(move(a), move(b)) for a, b in blocks]
    leaves = [q, k, v, kv_b.weight] + [t for block in blocks for t in block]
    out = prefix_attention(q, k, v, blocks, expand, [kv_b.weight], 0.1)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    as_float = [t.detach().float().requires_grad_() for t in leaves]
    kv_b_float = nn.Linear(64, 4 * 128, bias=False).cuda()
    kv_b_float.weight = nn.Parameter(as_float[3])
    as_float[3] = kv_b_float.weight  # the Parameter is a new tensor (sharing the storage): it is what the graph uses
    ref = prefix_attention_reference(*as_float[:3], list(zip(as_float[4::2], as_float[5::2])),
                                     lambda lat, sh: expand_with(kv_b_float, lat, sh), [], 0.1)
    ref_grads = torch.autograd.grad(ref.square().sum(), as_float)
    relative = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    assert relative(out, ref) < 2e-2
    for got, expected in zip(grads, ref_grads):
        assert relative(got, expected) < 3e-2


def expand_with(kv_b, latent, shared, H=4, nope=64, v_dim=64):
    B = latent.shape[0]
    kv = kv_b(latent).view(B, latent.shape[1], H, nope + v_dim).transpose(1, 2)
    k_nope, v = kv.split([nope, v_dim], dim=-1)
    return torch.cat([k_nope, shared[:, None].expand(-1, H, -1, -1)], dim=-1), v
