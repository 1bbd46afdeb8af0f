"""The forward contract: packing, padding, loss variants, router statistics, aux loss, checkpointing, cache."""

from __future__ import annotations

import pytest
import torch
from model_helpers import assert_close_to_scale, micro_config, perturb_

from kimitune import KimiLinearForCausalLM
from kimitune.model import KimiLinearCache, RunOptions, modeling
from kimitune.model.modeling import checkpointed_layer_indices
from kimitune.model.moe import KimiLinearMoE, Routing, router_terms

LENGTHS = [5, 7, 4]


def packed_batch(lengths=LENGTHS, seed=0):
    """(sequences as [1, L] tensors, the packed [1, total] row, cu_seqlens int32)."""
    generator = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 250, (1, n), generator=generator) for n in lengths]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return sequences, torch.cat(sequences, dim=1), cu_seqlens


def test_packed_equals_separate_in_every_layer_type(micro_model):
    sequences, packed, cu_seqlens = packed_batch()
    with torch.no_grad():
        separate = torch.cat([micro_model(s).logits for s in sequences], dim=1)
        together = micro_model(packed, cu_seqlens=cu_seqlens).logits
        unpacked = micro_model(packed).logits
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)
    # Without cu_seqlens the later sequences see the earlier ones: the test above is not vacuous.
    assert not torch.allclose(unpacked[:, LENGTHS[0]:], separate[:, LENGTHS[0]:], atol=1e-3)


@pytest.mark.parametrize("layer_index", [0, 3])
def test_each_layer_keeps_packed_sequences_apart(micro_model, layer_index):
    """KDA (layer 0: conv and recurrence) and MLA (layer 3) each on their own."""
    _, packed, cu_seqlens = packed_batch()
    attention = micro_model.model.layers[layer_index].self_attn
    x = torch.randn(1, packed.shape[1], micro_model.config.hidden_size)
    with torch.no_grad():
        together, _ = attention(x, cu_seqlens)
        bounds = cu_seqlens.tolist()
        separate = torch.cat([attention(x[:, s:e])[0] for s, e in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-6)


def test_packed_loss_equals_separate_loss(micro_model):
    """The last token of a sequence never predicts the next sequence's first token."""
    sequences, packed, cu_seqlens = packed_batch()
    with torch.no_grad():
        sums = [micro_model(s, labels=s, loss_reduction="sum").loss for s in sequences]
        packed_sum = micro_model(packed, labels=packed, cu_seqlens=cu_seqlens, loss_reduction="sum").loss
        packed_mean = micro_model(packed, labels=packed, cu_seqlens=cu_seqlens).loss
    count = sum(n - 1 for n in LENGTHS)
    assert packed_sum.item() == pytest.approx(sum(sums).item(), rel=1e-5)
    assert packed_mean.item() == pytest.approx(sum(sums).item() / count, rel=1e-5)


def test_right_padding_leaves_real_tokens_untouched(micro_model):
    ids = torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.cat([ids[:, :6], torch.full((1, 3), 255)], dim=1), ids])
    labels = padded.clone()
    labels[0, 6:] = -100
    with torch.no_grad():
        alone = micro_model(ids[:, :6], labels=ids[:, :6], loss_reduction="sum")
        batch = micro_model(padded, labels=labels, loss_reduction="sum")
        second = micro_model(ids, labels=ids, loss_reduction="sum")
    torch.testing.assert_close(batch.logits[0, :6], alone.logits[0], rtol=1e-5, atol=1e-5)
    assert batch.loss.item() == pytest.approx((alone.loss + second.loss).item(), rel=1e-5)


def test_loss_is_transformers_shifted_mean(micro_model):
    ids = torch.randint(0, 250, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :5] = -100
    with torch.no_grad():
        out = micro_model(ids, labels=labels)
    logits, targets = out.logits[:, :-1].reshape(-1, 256), labels[:, 1:].reshape(-1)
    expected = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)


def _loss_and_grads(model, **kwargs):
    model.zero_grad()
    loss = model(**kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_without_logits_matches_value_and_gradients():
    torch.manual_seed(0)
    model = perturb_(KimiLinearForCausalLM(micro_config()))
    sequences, packed, cu_seqlens = packed_batch()
    for reduction in ("mean", "sum"):
        args = dict(input_ids=packed, labels=packed, cu_seqlens=cu_seqlens, loss_reduction=reduction)
        loss, grads = _loss_and_grads(model, **args)
        out = model(**args, return_logits=False)
        assert out.logits is None
        fused, fused_grads = _loss_and_grads(model, **args, return_logits=False)
        assert fused.item() == pytest.approx(loss.item(), rel=1e-5)
        assert grads.keys() == fused_grads.keys()
        for name in grads:
            assert_close_to_scale(fused_grads[name], grads[name], 1e-5, name)


@pytest.mark.parametrize("num_layers", [None, 1])
def test_gradient_checkpointing_gives_the_same_gradients(num_layers, monkeypatch):
    torch.manual_seed(0)
    model = perturb_(KimiLinearForCausalLM(micro_config(router_aux_loss_coef=0.01)))
    _, packed, cu_seqlens = packed_batch()

    def run(options=None):
        model.zero_grad()
        out = model(packed, labels=packed, cu_seqlens=cu_seqlens, options=options)
        (out.loss + out.aux_loss).backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, plain_grads = run()
    recomputing = []
    real_checkpoint = modeling.checkpoint
    monkeypatch.setattr(modeling, "checkpoint", lambda layer, *args, **kw: (recomputing.append(layer),
                                                                          real_checkpoint(layer, *args, **kw))[1])
    recomputed, recomputed_grads = run(RunOptions(recompute_layers=model.recomputed_layers(num_layers)))
    expected = list(model.model.layers) if num_layers is None else [model.model.layers[len(model.model.layers) // 2]]
    assert recomputing == expected
    assert recomputed.loss.item() == plain.loss.item()
    torch.testing.assert_close(recomputed.router_stats, plain.router_stats)
    assert plain_grads.keys() == recomputed_grads.keys()
    for name in plain_grads:
        assert_close_to_scale(recomputed_grads[name], plain_grads[name], 1e-6, name)


def test_checkpointed_layers_are_spread_and_counted():
    assert checkpointed_layer_indices(4, 0) == []
    assert checkpointed_layer_indices(4, 1) == [2]
    assert checkpointed_layer_indices(4, 2) == [1, 3]
    assert checkpointed_layer_indices(27, 27) == list(range(27))
    assert all(len(checkpointed_layer_indices(27, k)) == k for k in range(28))
    model = KimiLinearForCausalLM(micro_config())
    with pytest.raises(ValueError, match="gradient_checkpointing_layers: 9 is not between 1 and the model's"):
        model.recomputed_layers(9)


def test_kda_keep_intermediates_reaches_every_kda_layers_kernel_call(micro_model, monkeypatch):
    """RunOptions.kda_keep_intermediates reaches every KDA layer's chunk_kda; the PyTorch path computes the same loss
    with it (fla's outputs with it on are checked in tests/ops/test_kda_gpu.py)."""
    from kimitune.model import kda

    _, packed, cu_seqlens = packed_batch()
    calls = []
    real = kda.chunk_kda
    monkeypatch.setattr(kda, "chunk_kda", lambda *a, **kw: (calls.append(kw["keep_intermediates"]), real(*a, **kw))[1])
    plain = micro_model(packed, labels=packed, cu_seqlens=cu_seqlens).loss
    kept = micro_model(packed, labels=packed, cu_seqlens=cu_seqlens, options=RunOptions(kda_keep_intermediates=True)).loss
    kda_layers = [layer.is_kda for layer in micro_model.model.layers]
    assert calls == [False] * sum(kda_layers) + [True] * sum(kda_layers)
    assert kept.item() == plain.item()


def test_router_stats_count_every_routed_copy(micro_model):
    _, packed, cu_seqlens = packed_batch()
    with torch.no_grad():
        out = micro_model(packed, cu_seqlens=cu_seqlens)
    config = micro_model.config
    assert out.router_stats.shape == (config.num_moe_layers, config.num_experts)
    assert out.router_stats.dtype == torch.int64
    assert out.router_stats.sum(1).tolist() == [packed.numel() * config.num_experts_per_token] * 3
    # The first MoE layer's counts are those of the router's own choices on that layer's input.
    captured = {}
    layer = micro_model.model.layers[1]
    handle = layer.mlp.register_forward_pre_hook(lambda module, args: captured.update(x=args[0]))
    with torch.no_grad():
        micro_model(packed, cu_seqlens=cu_seqlens)
        experts = layer.mlp.gate(captured["x"].reshape(-1, config.hidden_size)).experts
    handle.remove()
    torch.testing.assert_close(out.router_stats[0], torch.bincount(experts.reshape(-1), minlength=8))


def test_balance_loss_formula():
    """sum_e f_e * P_e with f_e = E / (k N) * count_e and P_e the mean normalised score (E=4, k=2, N=4)."""
    uniform = Routing(weights=None, experts=None, scores=torch.full((4, 4), 0.5))
    assert router_terms(uniform, torch.tensor([2, 2, 2, 2]), 2).balance().item() == pytest.approx(1.0)
    skewed = Routing(weights=None, experts=None, scores=torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(4, 4))
    terms = router_terms(skewed, torch.tensor([8, 0, 0, 0]), 2)
    assert terms.balance().item() == pytest.approx(4 / (2 * 4) * 8 * 0.7)
    # terms of two halves of the tokens add up to the whole's
    halves = router_terms(Routing(None, None, skewed.scores[:1]), torch.tensor([2, 0, 0, 0]), 2) + \
        router_terms(Routing(None, None, skewed.scores[1:]), torch.tensor([6, 0, 0, 0]), 2)
    assert halves.balance().item() == pytest.approx(terms.balance().item())


def test_aux_loss_is_off_by_default_and_differentiable_when_on():
    _, packed, cu_seqlens = packed_batch()
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(micro_config())
    assert model(packed, cu_seqlens=cu_seqlens).aux_loss is None
    out = model(packed, cu_seqlens=cu_seqlens, options=RunOptions(router_aux_loss_coef=0.5))
    out.aux_loss.backward()
    assert 0.5 * 0.9 < out.aux_loss.item() < 0.5 * 8  # coef * a balance loss near 1 for a fresh router
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_cache_continues_where_the_last_call_stopped(micro_model):
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = micro_model(ids).logits
        cache = KimiLinearCache()
        first = micro_model(ids[:, :6], cache=cache).logits
        steps = [micro_model(ids[:, t : t + 1], cache=cache).logits for t in range(6, 10)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_ids=torch.zeros(2, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32)),
         "one row"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4])), "int32"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 3], dtype=torch.int32)),
         "rise from 0"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), return_logits=False), "needs labels"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 3, dtype=torch.long)),
         "labels"),
        (dict(input_ids=torch.zeros(1, 4, dtype=torch.long), loss_reduction="avg"), "loss_reduction"),
        (dict(input_ids=torch.zeros(4)), "integer tensor"),
    ],
)
def test_bad_inputs_are_named(micro_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        micro_model(**kwargs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_step_matches_cpu(micro_model):
    """The whole model on the GPU (fla / grouped_mm / cut-cross-entropy paths where installed) against float32 CPU."""
    sequences, packed, cu_seqlens = packed_batch()
    with torch.no_grad():
        expected = micro_model(packed, labels=packed, cu_seqlens=cu_seqlens)
    model = KimiLinearForCausalLM(micro_model.config)
    model.load_state_dict(micro_model.state_dict())
    model = model.to("cuda", torch.bfloat16)
    # cu_seqlens stays on the host (kimitune.ops' preference); the no-grad pass below gives it on the device.
    out = model(packed.cuda(), labels=packed.cuda(), cu_seqlens=cu_seqlens, return_logits=False,
                options=RunOptions(recompute_layers=model.recomputed_layers()))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(expected.loss.item(), rel=2e-2)
    torch.testing.assert_close(out.router_stats.sum(1).cpu(), expected.router_stats.sum(1))
    with torch.no_grad():
        separate = torch.cat([model(s.cuda()).logits for s in sequences], dim=1)
        together = model(packed.cuda(), cu_seqlens=cu_seqlens.cuda()).logits
    torch.testing.assert_close(together.float(), separate.float(), rtol=3e-2, atol=3e-2)
