"""CE-LoRA on the GPU as the trainer runs it: bf16 frozen weights, float32 adapters, bf16 autocast, checkpointing."""

import pytest
import torch
from adapter_helpers import randomize_lora, tiny_config, token_ids

from kimitune import KimiLinearForCausalLM
from kimitune.adapters import LoraSettings, apply_lora, lora_modules
from kimitune.adapters.ce_lora import CeLoraSettings, apply_ce_lora, approximated_modules
from kimitune.ops import grouped_mm
from kimitune.model import RunOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SETTINGS = LoraSettings(r=16, alpha=32, target_linear=True, target_experts=True)


def cuda_model(state, ce: CeLoraSettings | None):
    model = KimiLinearForCausalLM(tiny_config())
    model.load_state_dict(state)
    model = model.to("cuda", torch.bfloat16)
    apply_ce_lora(model, SETTINGS, ce) if ce else apply_lora(model, SETTINGS)
    randomize_lora(model)
    return model.train()


def test_cuda_bf16_ce_lora_steps(monkeypatch):
    def no_loop(*args, **kwargs):
        raise AssertionError("a grouped product fell back to the per-expert loop (a host sync per call)")

    monkeypatch.setattr(grouped_mm, "grouped_linear_reference", no_loop)  # every grouped GEMM: torch._grouped_mm
    torch.manual_seed(0)
    state = KimiLinearForCausalLM(tiny_config()).state_dict()
    lora = cuda_model(state, None)
    ce = cuda_model(state, CeLoraSettings(sparsity=0.5, refresh_steps=2))
    ids = token_ids().cuda()
    for step in range(3):  # refreshes at backward passes 0 and 2
        losses = []
        for model in (lora, ce):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, labels=ids, return_logits=False, options=RunOptions(recompute_layers=model.recomputed_layers())).loss
            loss.backward()
            losses.append(loss.item())
        assert losses[1] == losses[0]  # the forward is LoRA's, exactly (no update happens here)
        expected = torch.cat([m.lora_B.grad.flatten() for m in lora_modules(lora).values()])
        got = torch.cat([m.lora_B.grad.flatten() for m in lora_modules(ce).values()])
        assert torch.isfinite(got).all()
        assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.9
        for model in (lora, ce):
            model.zero_grad(set_to_none=True)
    # Layer 0's input projections never get a backward (their input, the frozen embedding, needs no gradient).
    used = {name: a for name, a in approximated_modules(ce).items() if a.backward_passes}
    assert len(used) > len(approximated_modules(ce)) / 2
    for name, approx in used.items():
        assert approx.backward_passes == 3, name
        assert approx.kept_residual.dtype == torch.bfloat16 and approx.kept_residual.is_cuda, name
        assert approx.kept_rows % 8 == 0 and approx.double_rank % 8 == 0, name
