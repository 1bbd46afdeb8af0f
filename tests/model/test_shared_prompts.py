"""Shared prompts (kimitune/model/shared_prompts.py): a row of prompts then replies, each reply continuing from its
prompt's states, gives every reply token the loss it has after its whole prompt, and the same gradients, in
float32 on the CPU (LoRA and full fine-tuning, recomputed layers or not, with a padding sequence)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_helpers import assert_close_to_scale, perturbed_micro_model  # noqa: E402

from kimitune.model import RunOptions  # noqa: E402

IGNORE = -100


def pairs(seed: int = 0):
    """Three (prompt, chosen reply, rejected reply) of token ids; prompts of 2 to 9 tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 250, (n,), generator=generator)  # noqa: E731
    return [(ids(p), ids(c), ids(r)) for p, c, r in ((5, 4, 7), (9, 3, 3), (2, 6, 1))]


def unshared_row(examples, pad: int):
    """[P C][P R] per pair (then ``pad`` padding tokens): ids, labels (the replies'), bounds, each reply's sequence."""
    parts, labels, bounds = [], [], [0]
    for prompt, *replies in examples:
        for reply in replies:
            parts.append(torch.cat([prompt, reply]))
            labels.append(torch.cat([torch.full_like(prompt, IGNORE), reply]))
            bounds.append(bounds[-1] + len(parts[-1]))
    return _row(parts, labels, bounds, pad)


def shared_row(examples, pad: int):
    """[P_1' .. P_n' | p_1 C_1, p_1 R_1, ..] (then ``pad`` padding tokens), as model/shared_prompts.py lays it out."""
    parts = [prompt[:-1] for prompt, *_ in examples]
    labels = [torch.full_like(part, IGNORE) for part in parts]
    for prompt, *replies in examples:
        for reply in replies:
            parts.append(torch.cat([prompt[-1:], reply]))
            labels.append(torch.cat([torch.full((1,), IGNORE), reply]))
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + len(part))
    return _row(parts, labels, bounds, pad)


def _row(parts, labels, bounds, pad: int):
    if pad:
        parts, labels = parts + [torch.zeros(pad, dtype=torch.long)], labels + [torch.full((pad,), IGNORE)]
        bounds = bounds + [bounds[-1] + pad]
    return torch.cat(parts)[None], torch.cat(labels)[None], torch.tensor(bounds, dtype=torch.int32)


def reply_losses(model, ids, labels, bounds, options, replies: slice):
    """Each reply sequence's summed token loss (the sequences ``replies`` of the row)."""
    out = model(ids, labels=labels, cu_seqlens=bounds, return_logits=False, loss_reduction="none", options=options)
    sums = torch.stack([out.loss[a:b].sum() for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())])
    return sums[replies]


def build(lora: bool, **widths):
    return perturbed_micro_model(lora, router_aux_loss_coef=0.0, **widths)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("recompute, shards", [(False, 1), (True, 1), (True, 3)],
                         ids=["whole", "recomputed", "recomputed-tiled-mlp"])
@pytest.mark.parametrize("pad", [0, 4])
def test_replies_after_a_shared_prompt_equal_replies_after_their_own(lora, recompute, shards, pad):
    examples = pairs()
    n = len(examples)
    weights = torch.randn(2 * n, generator=torch.Generator().manual_seed(3))  # a loss that weighs every reply

    results = []
    for shared in (False, True):
        model = build(lora)
        ids, labels, bounds = (shared_row if shared else unshared_row)(examples, pad)
        options = RunOptions(recompute_layers=model.recomputed_layers() if recompute else frozenset(),
                             prompt_sequences=n if shared else 0, mlp_shards=shards if shared else 1)
        sums = reply_losses(model, ids, labels, bounds, options, slice(n, 3 * n) if shared else slice(0, 2 * n))
        (sums * weights).sum().backward()
        results.append((sums.detach(), {k: p.grad for k, p in model.named_parameters() if p.requires_grad}))
    (expected, expected_grads), (got, got_grads) = results
    assert_close_to_scale(got, expected, 1e-5, "reply losses")
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert_close_to_scale(got_grads[name], grad, 1e-5, name)


def test_rows_that_cannot_share_their_prompts_are_refused():
    model = build(False)
    ids, labels, bounds = shared_row(pairs(), 0)
    with pytest.raises(ValueError, match="fewer than 4 prompts"):
        model(ids, labels=labels, cu_seqlens=bounds, options=RunOptions(prompt_sequences=4))
    with pytest.raises(ValueError, match="needs a packed row"):
        model(ids, labels=labels, options=RunOptions(prompt_sequences=3))
    one_token = [(torch.tensor([7]), torch.tensor([1, 2]), torch.tensor([3]))]
    ids, labels, bounds = shared_row(one_token, 0)
    with pytest.raises(ValueError, match="prompts of one token"):
        model(ids, labels=labels, cu_seqlens=bounds, options=RunOptions(prompt_sequences=1))
    with pytest.raises(ValueError, match="no cache, context parallelism, sequence_piece_len"):
        model(ids, labels=labels, cu_seqlens=bounds, options=RunOptions(prompt_sequences=1, sequence_piece_len=4))


def test_each_feed_forward_block_runs_once_over_the_whole_row(monkeypatch):
    """The attention runs over the prompts, then the replies; the MoE / MLP, token by token, once over all the row's
    tokens (each expert's GEMMs at the whole row's rows: twice the rows of either half)."""
    model = build(False)
    ids, labels, bounds = shared_row(pairs(), 4)
    calls = []
    for layer in model.model.layers:
        forward = layer.mlp.forward
        monkeypatch.setattr(layer.mlp, "forward",
                            lambda x, forward=forward: calls.append(x.reshape(-1, x.shape[-1]).shape[0]) or forward(x))
    model(ids, labels=labels, cu_seqlens=bounds, options=RunOptions(prompt_sequences=3))
    assert calls == [ids.shape[1]] * len(model.model.layers)


def test_an_mla_layer_takes_one_span_per_sequence():
    from kimitune.model.mla import SequencePrefixes

    attention = build(False).model.layers[3].self_attn  # the micro model's MLA layer
    x = torch.randn(1, 6, 32)
    prefixes = SequencePrefixes(torch.randn(1, 4, 16), torch.randn(1, 4, 8), [(0, 4)])
    with pytest.raises(ValueError, match="1 spans for 2 sequences"):
        attention(x, torch.tensor([0, 2, 6], dtype=torch.int32), prefixes)


# test_pieces_gpu.py's widths: heads of 64, which fla's kernels and flash attention take
GPU_WIDTHS = dict(hidden_size=128, kda_num_heads=2, kda_head_dim=64, num_attention_heads=2, head_dim=64,
                  qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shared_prompts_on_the_gpu_equal_whole_pairs():
    """The CUDA path (fla's KDA with per-sequence initial and final states, the prefix attention's flash kernels,
    which take bf16) in bf16, routing pinned to two experts as tests/model/test_pieces_gpu.py pins it: reply losses
    within 1e-2 and every LoRA gradient within 5e-2 (relative norms)."""
    examples = pairs()
    n = len(examples)
    results = []
    for shared in (False, True):
        model = build(True, **GPU_WIDTHS).cuda().bfloat16()
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.zero_()[:2] = 10.0
        ids, labels, bounds = (shared_row if shared else unshared_row)(examples, 4)
        options = RunOptions(recompute_layers=model.recomputed_layers(), prompt_sequences=n if shared else 0)
        sums = reply_losses(model, ids.cuda(), labels.cuda(), bounds, options,
                            slice(n, 3 * n) if shared else slice(0, 2 * n))
        sums.sum().backward()
        results.append((sums.detach().float().cpu(),
                        {k: p.grad.float().cpu() for k, p in model.named_parameters() if p.requires_grad}))
    (expected, expected_grads), (got, got_grads) = results
    relative = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12)).item()  # noqa: E731
    assert relative(got, expected) < 1e-2
    worst = max((relative(got_grads[k], g), k) for k, g in expected_grads.items() if g.norm() > 0)
    assert worst[0] < 5e-2, worst
