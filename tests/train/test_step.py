"""kimitune.train.step.TrainStep: the step the Trainer runs and the benchmarks time. It computes what a plain loop
computes, skips a non-finite step on the device (weights, moments and step count untouched), counts what it skipped,
and on a GPU never makes the host wait inside a step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "adapters"))
from adapter_helpers import tiny_config  # noqa: E402

from kimitune.adapters import LoraSettings, apply_lora  # noqa: E402
from kimitune.data.packing import Batch  # noqa: E402
from kimitune.model import KimiLinearForCausalLM, RunOptions  # noqa: E402
from kimitune.train.step import TrainStep, skips_on_device  # noqa: E402


def lora_model(seed: int = 0, device: str = "cpu", dtype=torch.float32) -> KimiLinearForCausalLM:
    torch.manual_seed(seed)
    model = KimiLinearForCausalLM(tiny_config()).to(device, dtype).train()
    apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.05)
    return model


def packed_batch(seed: int, lengths=(5, 9, 10)) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (1, sum(lengths)), generator=gen)
    labels = ids.clone()
    labels[:, :2] = -100
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    label_tokens = int((labels[:, 1:] != -100).sum()) - (len(lengths) - 1)  # each later sequence's first position
    return Batch(input_ids=ids, labels=labels, cu_seqlens=bounds, num_tokens=ids.shape[1], num_label_tokens=label_tokens)


def optimizer_for(model) -> torch.optim.AdamW:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)


def test_a_step_is_the_plain_loop():
    batches = [packed_batch(1), packed_batch(2)]
    label_tokens = sum(b.num_label_tokens for b in batches)
    ours, plain = lora_model(), lora_model()
    step = TrainStep(ours, optimizer_for(ours), "cpu", max_grad_norm=0.5)
    stats = step(batches, label_tokens, 2)

    optimizer = optimizer_for(plain)
    total = 0.0
    for batch in batches:
        out = plain(batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens, return_logits=False,
                    loss_reduction="sum")
        (out.loss / label_tokens).backward()
        total += out.loss.item()
    params = [p for p in plain.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, 0.5)
    optimizer.step()

    assert stats.loss.item() == pytest.approx(total / label_tokens, rel=1e-6)
    assert stats.grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
    assert stats.finite.item()
    for (name, a), b in zip(ours.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert all(p.grad is None for p in ours.parameters())


def test_a_non_finite_step_changes_nothing_and_is_counted(monkeypatch):
    model = lora_model()
    optimizer = optimizer_for(model)
    assert skips_on_device(optimizer)
    step = TrainStep(model, optimizer, "cpu", max_grad_norm=1.0)
    batch = packed_batch(1)
    step([batch], batch.num_label_tokens)  # one good step: the optimizer has moments and a step count
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    moments = {k: v.clone() for k, v in optimizer.state[next(iter(optimizer.state))].items()}

    real_forward = KimiLinearForCausalLM.forward

    def poisoned(self, *args, **kwargs):
        out = real_forward(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(KimiLinearForCausalLM, "forward", poisoned)
    for _ in range(3):
        stats = step([batch], batch.num_label_tokens)
    assert not stats.finite.item()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
    for key, value in optimizer.state[next(iter(optimizer.state))].items():
        assert torch.equal(value, moments[key]), key  # exp_avg, exp_avg_sq and the step count
    monkeypatch.setattr(KimiLinearForCausalLM, "forward", real_forward)
    step([batch], batch.num_label_tokens)
    counters = step.counters()
    assert (counters.skipped, counters.bad_in_a_row, counters.longest_bad_run) == (3, 0, 3)
    assert step.counters().longest_bad_run == 0  # a new window after each read


def test_the_options_reach_the_model(monkeypatch):
    model = lora_model()
    seen = []
    real_forward = KimiLinearForCausalLM.forward
    monkeypatch.setattr(KimiLinearForCausalLM, "forward",
                        lambda self, *a, options=None, **kw: (seen.append(options), real_forward(self, *a, options=options,
                                                                                                 **kw))[1])
    options = RunOptions(recompute_layers=model.recomputed_layers(1), kda_keep_intermediates=True)
    batch = packed_batch(1)
    TrainStep(model, optimizer_for(model), "cpu", options=options)([batch], batch.num_label_tokens)
    assert seen == [options]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_steps_never_wait_for_the_gpu():
    """Packed bf16 LoRA steps (host batch, clipping, fused AdamW with the device-side skip) make no host-device sync:
    the batch goes over from pinned memory, its layout is built once, the loss's rows come from an early copy."""
    model = lora_model(device="cuda", dtype=torch.bfloat16)
    step = TrainStep(model, optimizer_for(model), "cuda", max_grad_norm=1.0)
    batch = packed_batch(1)
    for i in range(3):  # the first steps autotune kernels, which may sync
        torch.cuda.set_sync_debug_mode("error" if i == 2 else "default")
        try:
            stats = step([batch], batch.num_label_tokens)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert stats.finite.item() and step.counters().skipped == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["dpo", "orpo", "dpo-shared-prompts"])
def test_cuda_preference_steps_never_wait_for_the_gpu(kind):
    """A packed row of two pairs (DPO with its reference log-probabilities, ORPO with its whole-sequence NLL, DPO
    with the pairs' prompts computed once): the per-sequence sums, the pair terms and the rewards stay on the device
    too."""
    from kimitune.data.preference import PreferenceBatch
    from kimitune.train.preference import PreferenceObjective, PreferenceSettings

    model = lora_model(device="cuda", dtype=torch.bfloat16)
    shared = kind == "dpo-shared-prompts"  # two prompts, then each pair's two replies (model/shared_prompts.py)
    rows = packed_batch(3, lengths=(5, 7, 3, 4, 2, 5) if shared else (6, 8, 7, 9))
    batch = PreferenceBatch(rows.input_ids, rows.labels, rows.cu_seqlens, torch.tensor([1, 0]), rows.num_tokens,
                            rows.num_label_tokens, prompts=2 if shared else 0)
    kind = "dpo" if shared else kind
    reference = torch.tensor([[-40.0, -41.0], [-30.0, -32.0]]) if kind == "dpo" else None
    objective = PreferenceObjective(PreferenceSettings(kind, beta=0.1), reference)
    step = TrainStep(model, optimizer_for(model), "cuda", max_grad_norm=1.0, objective=objective)
    counts = objective.denominator([batch])
    for i in range(3):
        torch.cuda.set_sync_debug_mode("error" if i == 2 else "default")
        try:
            stats = step([batch], counts)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert stats.finite.item() and stats.sums["pairs"].item() == 2
