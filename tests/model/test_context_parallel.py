"""Context parallelism on the CPU (gloo; kimitune/model/context_parallel.py): a row split over 1, 2 and 4 ranks by the
model's own forward (``RunOptions(context_parallel=group)``) gives the one-process loss (with the load-balancing
loss) and every trained gradient (summed over the ranks) within 1e-5 of their scale, packed rows whose sequences do
and do not cross the ranks' boundaries and unpacked ones, LoRA and full fine-tuning, with and without recomputed
layers. The trainer's ``context_parallel_size`` under FSDP2 is tested in tests/train/test_distributed.py."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_helpers import micro_config, perturbed_micro_model  # noqa: E402

from kimitune.model import RunOptions  # noqa: E402

CASES = {
    "packed": (1, 48, [0, 3, 17, 24, 30, 48]),  # 2 ranks: cut at 24 (a boundary); 4 ranks: 12, 24, 36 (inside too)
    "unpacked": (2, 24, None),
    # 4 ranks: shares of 9 tokens, which do not halve, so each rank attends for its own queries (2 ranks: balanced)
    "packed_odd_shares": (1, 36, [0, 10, 29, 36]),
}


def build(lora: bool):
    return perturbed_micro_model(lora, router_aux_loss_coef=0.05)


def batch(case: str):
    rows, tokens, bounds = CASES[case]
    ids = torch.randint(0, 250, (rows, tokens), generator=torch.Generator().manual_seed(1))
    return ids, None if bounds is None else torch.tensor(bounds, dtype=torch.int32)


def one_process(case: str, lora: bool):
    model = build(lora)
    ids, bounds = batch(case)
    out = model(ids, labels=ids, cu_seqlens=bounds, return_logits=False, loss_reduction="sum")
    (out.loss + out.aux_loss).backward()
    return out.loss.detach() + out.aux_loss.detach(), {n: p.grad for n, p in model.named_parameters()
                                                       if p.requires_grad}


def _worker(rank: int, ranks: int, init: str, case: str, lora: bool, out: str):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=ranks)
    torch.set_num_threads(1)
    model = build(lora)
    ids, bounds = batch(case)
    # LoRA with every layer recomputed, full fine-tuning with none: both paths of each layer across the ranks
    options = RunOptions(context_parallel=dist.group.WORLD,
                         recompute_layers=model.recomputed_layers() if lora else frozenset())
    result = model(ids, labels=ids, cu_seqlens=bounds, return_logits=False, loss_reduction="sum", options=options)
    loss = result.loss + result.aux_loss  # the summed token loss and the load-balancing loss, as the one process adds them
    loss.backward()
    dist.all_reduce(loss.detach_())
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    for grad in grads.values():
        dist.all_reduce(grad)
    if rank == 0:
        torch.save((loss, grads), out)
    dist.destroy_process_group()


def test_mla_blocks_give_every_rank_the_same_causal_work():
    """Balanced routes: rank r computes query blocks r and 2N - 1 - r of 2N, so every rank scores as many
    query-key pairs as any other (each rank's own share would give the last rank 2N - 1 times the first's)."""
    from kimitune.model.context_parallel import AttentionRoutes, split_into_pieces

    def pairs(routes, rank):  # causal query-key pairs of an unpacked row
        return sum(b.start * (b.end - b.start) + (b.end - b.start) * (b.end - b.start + 1) // 2
                   for b in (routes.blocks[c] for c in routes.worked(rank)))

    for ranks in (2, 4, 8):
        total = 64 * ranks
        routes = AttentionRoutes.balanced(None, total, ranks, torch.device("cpu"))
        assert sorted(c for r in range(ranks) for c in routes.worked(r)) == list(range(2 * ranks))
        assert [routes.owned(r) for r in range(ranks)] == [[2 * r, 2 * r + 1] for r in range(ranks)]
        assert len({pairs(routes, r) for r in range(ranks)}) == 1
        local = AttentionRoutes.local(split_into_pieces(None, total, 64, torch.device("cpu")))
        assert pairs(local, ranks - 1) > (2 * ranks - 2) * pairs(local, 0)


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ranks_equal_one_process(ranks, case, lora):
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "result.pt")
        mp.spawn(_worker, args=(ranks, f"file://{folder}/init", case, lora, out), nprocs=ranks, join=True)
        loss, grads = torch.load(out)
    expected_loss, expected = one_process(case, lora)
    assert abs(loss - expected_loss) <= 1e-5 * abs(expected_loss)
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        error, scale = (grads[name] - grad).abs().max().item(), grad.abs().max().item()
        assert error <= 1e-5 * scale + 1e-9, f"{name}: {error:.3g} against {scale:.3g}"


def test_a_row_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # a two-rank group, as far as the check goes
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    ids = torch.zeros(1, 7, dtype=torch.long)
    options = RunOptions(context_parallel=object())
    with pytest.raises(ValueError, match="do not split evenly over 2 ranks"):
        build(False)(ids, labels=ids, loss_reduction="sum", return_logits=False, options=options)
    with pytest.raises(ValueError, match="loss_reduction 'sum' or 'none'"):
        build(False)(ids, labels=ids, return_logits=False, options=options)
    with pytest.raises(ValueError, match="drop sequence_piece_len and segment_layers"):
        build(False)(ids, labels=ids, loss_reduction="sum", return_logits=False,
                     options=RunOptions(context_parallel=object(), sequence_piece_len=4))
    from kimitune.model import KimiLinearCache

    model = build(False)
    with pytest.raises(ValueError, match="it takes no cache"):
        model(ids[:, :6], cache=KimiLinearCache(), options=options)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_context_parallel_path_on_one_gpu_equals_the_plain_path(tmp_path):
    """N = 1 on CUDA (nccl, one rank): the model's forward through the context-parallel path (fla's kernels,
    cuDNN or flash attention) gives the plain path's loss and gradients, packed, in float32."""
    dist.init_process_group("nccl", init_method=f"file://{tmp_path}/init", rank=0, world_size=1)
    try:
        model = build(True).cuda()
        ids, bounds = batch("packed")
        ids = ids.cuda()
        results = []
        for options in (RunOptions(), RunOptions(context_parallel=dist.group.WORLD)):
            model.zero_grad(set_to_none=True)
            out = model(ids, labels=ids, cu_seqlens=bounds, return_logits=False, loss_reduction="sum",
                        options=options)
            (out.loss + out.aux_loss).backward()
            results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                              if p.grad is not None}))
        (plain, plain_grads), (split, split_grads) = results
        assert split == pytest.approx(plain, rel=1e-4)
        for name, grad in plain_grads.items():
            error, scale = (split_grads[name] - grad).abs().max().item(), grad.abs().max().item()
            assert error <= 1e-3 * scale + 1e-7, name
    finally:
        dist.destroy_process_group()


def test_a_kda_layer_with_a_cp_context_takes_no_state():
    """fla passes the states between the ranks itself: a state in or out together with cp_context is refused (before
    any kernel is asked for)."""
    from kimitune.model.kda import KDAState, KimiDeltaAttention

    config = micro_config()
    layer = KimiDeltaAttention(config)
    x = torch.randn(1, 8, config.hidden_size)
    width = 3 * config.kda_num_heads * config.kda_head_dim
    state = KDAState(torch.zeros(1, width, config.kda_short_conv_kernel_size),
                     torch.zeros(1, config.kda_num_heads, config.kda_head_dim, config.kda_head_dim))
    with pytest.raises(ValueError, match="with cp_context .* no state, no return_state"):
        layer(x, state=state, cp_context=object())
    with pytest.raises(ValueError, match="with cp_context .* no state, no return_state"):
        layer(x, return_state=True, cp_context=object())
    with pytest.raises(ValueError, match="cp_context .* needs CUDA tensors"):  # no PyTorch path on the CPU
        layer(x, cp_context=object())
    mla_layer = build(False).model.layers[3]
    assert not mla_layer.is_kda
    with pytest.raises(ValueError, match="an MLA layer takes none"):
        mla_layer(x, cp_context=object())


def _one_of_two_ranks(monkeypatch):
    from kimitune.model import context_parallel

    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    return context_parallel


def test_share_of_row_on_the_cpu_keeps_the_projects_state_passing(monkeypatch):
    context_parallel = _one_of_two_ranks(monkeypatch)
    monkeypatch.setattr(context_parallel.fla, "context_parallel_available", lambda: True)  # as if fla were here
    bounds = torch.tensor([0, 3, 17, 24, 30, 48], dtype=torch.int32)
    layout = context_parallel.BatchLayout.of(bounds, "cpu")
    for row_layout, rows in ((layout, 1), (None, 1), (None, 2)):
        share = context_parallel.share_of_row(row_layout, 48, object(), torch.device("cpu"), rows=rows,
                                              conv_kernel_size=4)
        assert share.kda_context is None and share.piece.start == 24


def test_share_of_row_takes_flas_route_where_it_applies(monkeypatch):
    """On CUDA (one row, W - 1 tokens per rank, references not forced, fla.ops.cp present) the share carries fla's
    context, built from the whole row; otherwise none. (Unpacked rows: nothing here touches the device.)"""
    from kimitune.ops import force_reference

    context_parallel = _one_of_two_ranks(monkeypatch)
    built = []
    monkeypatch.setattr(context_parallel, "context_parallel_context", lambda *args: built.append(args) or "ctx")
    available = [True]
    monkeypatch.setattr(context_parallel.fla, "context_parallel_available", lambda: available[0])
    group, cuda = object(), torch.device("cuda")

    def share(total=48, rows=1, conv_kernel_size=4):
        return context_parallel.share_of_row(None, total, group, cuda, rows=rows,
                                             conv_kernel_size=conv_kernel_size).kda_context

    assert share() == "ctx" and built == [(None, 48, group, 4, cuda)]
    assert share(rows=2) is None  # fla's kernels take one row
    assert share(total=4) is None  # 2 tokens a rank: fewer than the conv's W - 1 = 3
    assert share(conv_kernel_size=None) is None
    with force_reference():
        assert share() is None
    available[0] = False
    assert share() is None
    assert len(built) == 1


def test_a_kda_layer_with_flas_context_runs_once_on_the_ranks_tokens():
    """With the share's kda_context the layer is called once, from no state, with the context; nothing is sent."""
    from kimitune.model.context_parallel import AttentionRoutes, RowShare, _kda_across_ranks
    from kimitune.model.pieces import split_into_pieces

    calls = []
    h = torch.randn(1, 12, 32)

    def layer(*args, **kwargs):
        calls.append((args, kwargs))
        return args[0] * 2, None, None

    pieces = split_into_pieces(None, 24, 12, torch.device("cpu"))
    share = RowShare(pieces, 1, object(), AttentionRoutes.local(pieces), kda_context="ctx")
    options = RunOptions()
    out, counts, score_sum = _kda_across_ranks(layer, h, share, options, recompute=False)
    assert torch.equal(out, h * 2) and counts is None and score_sum is None
    (args, kwargs), = calls
    assert args[0] is h and args[1:] == (None, None, False, options, "ctx") and not kwargs
