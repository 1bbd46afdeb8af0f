"""The adapters' shared bf16 copies (``kimitune/adapters/casts.py``): same numbers as per-layer casts, fewer casts."""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from adapter_helpers import tiny_config, token_ids
from torch.utils._python_dispatch import TorchDispatchMode

from kimitune import KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, lora_modules
from kimitune.adapters.layers import LoraLinear
from kimitune.model import RunOptions

pytestmark = pytest.mark.usefixtures("one_thread")


def bf16_lora_model(seed: int = 0) -> KimiLinearForCausalLM:
    """The tiny model in bf16 with float32 all-linear adapters whose B is random (so A gets gradients)."""
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_config()).to(torch.bfloat16).train()
    apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True))
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(std=0.02)
    return model


def without_shared_casts(model: KimiLinearForCausalLM) -> KimiLinearForCausalLM:
    """A copy of ``model`` whose adapted linears cast their own adapters (the per-layer path)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, LoraLinear):
            module.adapter_casts = None
    return twin


def loss_and_grads(model, ids, options=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(ids, labels=ids, options=options).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def assert_same(a: tuple, b: tuple) -> None:
    assert torch.equal(a[0], b[0])
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        assert torch.equal(a[1][name], b[1][name]), name


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA GPU")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_shared_casts_give_the_per_layer_numbers_bit_for_bit(checkpointing, device):
    model = bf16_lora_model().to(device)
    options = RunOptions(recompute_layers=model.recomputed_layers() if checkpointing else frozenset())
    twin = without_shared_casts(model)
    ids = token_ids().to(device)
    shared = loss_and_grads(model, ids, options)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in shared[1].values())
    assert_same(shared, loss_and_grads(twin, ids, options))


class CountCasts(TorchDispatchMode):
    """Counts ``_to_copy`` calls from float32 to bf16 and back."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and {args[0].dtype, kwargs.get("dtype")} == {
            torch.float32, torch.bfloat16
        }:
            self.count += 1
        return func(*args, **kwargs)


def test_a_pass_casts_all_adapters_once_each_way():
    model = bf16_lora_model()
    twin = without_shared_casts(model)
    ids = token_ids()
    counts = []
    for m in (model, twin):
        with CountCasts() as casts:
            m(ids, labels=ids).loss.backward()
        counts.append(casts.count)
    linears = sum(isinstance(m, LoraLinear) for m in model.modules())
    # The per-layer path casts A and B forward and their gradients back; the shared copies are one cast each way.
    assert counts[1] - counts[0] == 4 * linears - 2


def test_copies_follow_the_optimizer_and_accumulate_over_micro_batches():
    model = bf16_lora_model()
    twin = without_shared_casts(model)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (model, twin)]
    batches = [token_ids(seed) for seed in range(4)]
    for step in range(2):
        results = []
        for m, opt in zip((model, twin), optimizers):
            for ids in batches[2 * step: 2 * step + 2]:  # two micro-batches per step
                loss, grads = loss_and_grads(m, ids)
            results.append((loss, grads))
            opt.step()
            opt.zero_grad()
        assert_same(*results)
    # After the last step, an evaluation without gradients and a training pass both see the updated adapters.
    ids = batches[0]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twin(ids).logits)
    assert_same(loss_and_grads(model, ids), loss_and_grads(twin, ids))


def test_a_layer_called_on_its_own_sees_its_adapter_change():
    model = bf16_lora_model()
    layer = next(m for m in model.modules() if isinstance(m, LoraLinear))
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16)
    layer(x).float().sum().backward()
    with torch.no_grad():
        layer.lora_B.add_(1.0)
    expected = layer.base_output(x) + (x.float() @ layer.lora_A.T @ layer.lora_B.T * layer.scaling).bfloat16()
    torch.testing.assert_close(layer(x), expected, rtol=2e-2, atol=2e-2)


def test_frozen_adapters_and_float32_models_cast_nothing_shared():
    model = bf16_lora_model()
    for p in model.parameters():
        p.requires_grad_(False)
    twin = without_shared_casts(model)
    ids = token_ids()
    assert torch.equal(model(ids).logits, twin(ids).logits)
    casts = next(m for m in model.modules() if isinstance(m, LoraLinear)).adapter_casts
    assert casts.copies == {}

    torch.manual_seed(0)
    model32 = KimiLinearForCausalLM(tiny_config()).train()
    apply_lora(model32, LoraSettings(r=4, alpha=8, target_linear=True))
    model32(ids, labels=ids).loss.backward()
    assert next(m for m in model32.modules() if isinstance(m, LoraLinear)).adapter_casts.copies == {}


def test_a_deleted_model_is_freed_with_its_copies_alive_in_a_graph():
    model = bf16_lora_model()
    ids = token_ids()
    model(ids, labels=ids).loss.backward()
    model(ids, labels=ids)  # copies made and never backwarded
    layer = weakref.ref(next(m for m in model.modules() if isinstance(m, LoraLinear)))
    del model
    gc.collect()
    assert layer() is None


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_sharded_adapters_fall_back_to_per_layer_casts():
    """Under FSDP2 the adapters are DTensor shards outside their layer's forward: no shared copies, same loss."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = bf16_lora_model()
        twin = without_shared_casts(model)
        mesh = init_device_mesh("cpu", (1,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        ids = token_ids()
        loss, _ = loss_and_grads(model, ids)
        assert not next(m for m in model.modules() if isinstance(m, LoraLinear)).adapter_casts.enabled
        assert torch.equal(loss, loss_and_grads(twin, ids)[0])
    finally:
        dist.destroy_process_group()
