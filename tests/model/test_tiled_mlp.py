"""The feed-forward blocks in shards of tokens (model/tiled_mlp.py, Axolotl's tiled_mlp) equal the whole blocks: loss,
aux loss, router counts and every gradient, in float32 on the CPU, packed and unpacked, with and without recomputed
layers and pieces, full fine-tuning and LoRA."""

from __future__ import annotations

import pytest
import torch

from kimitune.model import RunOptions
from kimitune.model.tiled_mlp import shard_count

from test_pieces import PACKED_BOUNDS, assert_same_step, build, step


def batch(packed: bool):
    generator = torch.Generator().manual_seed(1)
    if packed:
        return torch.randint(0, 250, (1, PACKED_BOUNDS[-1]), generator=generator), \
            torch.tensor(PACKED_BOUNDS, dtype=torch.int32)
    return torch.randint(0, 250, (2, 23), generator=generator), None


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
@pytest.mark.parametrize("shards", [2, 5, None], ids=["2", "5", "auto"])
def test_shards_equal_the_whole_block(lora, packed, shards):
    model = build(lora, aux=0.01)
    input_ids, cu_seqlens = batch(packed)
    everything = model.recomputed_layers()
    plain = step(model, input_ids, cu_seqlens, RunOptions())
    assert_same_step(step(model, input_ids, cu_seqlens, RunOptions(mlp_shards=shards)), plain, "layers kept")
    assert_same_step(step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=everything, mlp_shards=shards)),
                     plain, "layers recomputed")


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_shards_inside_pieces_equal_the_whole_layers(packed):
    model = build(True, aux=0.01)
    input_ids, cu_seqlens = batch(packed)
    everything = model.recomputed_layers()
    plain = step(model, input_ids, cu_seqlens, RunOptions())
    tiled = step(model, input_ids, cu_seqlens,
                 RunOptions(recompute_layers=everything, sequence_piece_len=6, mlp_shards=4))
    assert_same_step(tiled, plain, "pieces of 6 in 4 shards")


def test_shards_run_one_at_a_time_in_the_backward(monkeypatch):
    """Each shard's block runs once in the forward and once more, alone, in the backward (what it kept is its
    input); a pass without gradients runs the block whole."""
    model = build(False, aux=0.0)
    input_ids, _ = batch(False)
    moe = model.model.layers[1].mlp
    calls = []
    original = type(moe).forward
    monkeypatch.setattr(type(moe), "forward", lambda self, x: calls.append(x.numel() // x.shape[-1]) or original(self, x))
    step(model, input_ids, None, RunOptions(mlp_shards=3))
    tokens = input_ids.numel()
    assert calls[:3] == [16, 16, 14] and sum(calls) == 2 * 3 * tokens  # 3 MoE layers, forward and recomputation
    calls.clear()
    with torch.no_grad():
        model(input_ids, options=RunOptions(mlp_shards=3))
    assert calls == [tokens] * 3


def test_shard_counts():
    assert shard_count(16384, 2304, None) == 8  # Axolotl's ceil(tokens / hidden_size)
    assert shard_count(100, 2304, None) == 1
    assert shard_count(100, 2304, 4) == 4
    assert shard_count(3, 2304, 8) == 3  # never more shards than tokens
    with pytest.raises(ValueError, match="mlp_shards must be at least 1"):
        RunOptions(mlp_shards=0)
