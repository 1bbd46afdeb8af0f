"""LoRA on the GPU as the trainer runs it: bf16 frozen weights, float32 adapters, bf16 autocast, checkpointing."""

import pytest
import torch
from adapter_helpers import randomize_lora, tiny_config, token_ids

from kimitune import KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, load_adapter, lora_modules, save_adapter
from kimitune.model import RunOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# r=16 keeps every grouped-matmul row 16-byte aligned in bf16 (torch._grouped_mm); r=4 takes the loop fallback.
@pytest.mark.parametrize("r", [16, 4])
def test_cuda_bf16_lora_step_matches_cpu(tmp_path, r):
    settings = LoraSettings(r=r, alpha=2 * r, dropout=0.0, target_linear=True, target_experts=True)
    input_ids = token_ids()
    torch.manual_seed(0)
    reference = KimiLinearForCausalLM(tiny_config()).eval()
    state = reference.state_dict()
    apply_lora(reference, settings)
    randomize_lora(reference)
    with torch.no_grad():
        expected = reference(input_ids, labels=input_ids).loss.item()
    save_adapter(reference, tmp_path, settings)

    model = KimiLinearForCausalLM(tiny_config())
    model.load_state_dict(state)
    model = model.to("cuda", torch.bfloat16)
    apply_lora(model, settings)
    load_adapter(model, tmp_path)
    assert all(m.lora_A.dtype == torch.float32 and m.lora_A.is_cuda for m in lora_modules(model).values())
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids.cuda(), labels=input_ids.cuda(), return_logits=False, options=RunOptions(recompute_layers=model.recomputed_layers())).loss
    loss.backward()
    assert loss.item() == pytest.approx(expected, rel=2e-2)
    for name, module in lora_modules(model).items():
        grad = module.lora_B.grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


def test_cuda_lora_training_step_never_waits_for_the_gpu():
    """A packed bf16 LoRA step (forward, backward, AdamW) makes no implicit host-device sync: the loss's rows come
    from an early asynchronous copy (``LossRows``), routing and grouped GEMMs stay on the device."""
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(tiny_config()).to("cuda", torch.bfloat16).train()
    apply_lora(model, LoraSettings(r=16, alpha=32, target_linear=True))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ids = torch.randint(3, 128, (1, 24), device="cuda")
    labels = ids.clone()
    labels[:, :5] = -100
    cu_seqlens = torch.tensor([0, 10, 24], dtype=torch.int32)  # on the host, as the trainer passes it
    for step in range(3):  # the first step autotunes kernels, which may sync
        torch.cuda.set_sync_debug_mode("error" if step == 2 else "default")
        try:
            loss = model(ids, labels=labels, cu_seqlens=cu_seqlens, return_logits=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
