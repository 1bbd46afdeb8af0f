"""Decoder layers computed in pieces along the sequence (model/pieces.py) equal the whole layers: loss, aux loss and
every gradient, in float32 on the CPU, packed and unpacked, for lengths that are not multiples of the piece, with
full fine-tuning and LoRA."""

from __future__ import annotations

import pytest
import torch

from kimitune import KimiLinearForCausalLM
from kimitune.adapters.lora import LoraSettings, apply_lora
from kimitune.model import RunOptions
from kimitune.model.pieces import split_into_pieces
from kimitune.ops import BatchLayout

from model_helpers import assert_close_to_scale, micro_config, perturb_

PACKED_BOUNDS = [0, 3, 17, 18, 30, 37]  # cut at 6, 12, 18, 24, 30, 36: sequences cross cuts, two end on one


def step(model, input_ids, cu_seqlens, options):
    model.zero_grad(set_to_none=True)
    labels = input_ids.clone()
    out = model(input_ids, labels=labels, cu_seqlens=cu_seqlens, return_logits=False, options=options)
    total = out.loss + (out.aux_loss if out.aux_loss is not None else 0)
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), None if out.aux_loss is None else out.aux_loss.detach(), out.router_stats, grads


def build(lora: bool, aux: float):
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(micro_config(router_aux_loss_coef=aux))
    if lora:
        apply_lora(model, LoraSettings(r=4, alpha=8, target_linear=True))
    return perturb_(model)  # LoRA's B too: otherwise A's gradients are zero and prove nothing


# float32 round-off of sums taken in another order (a piece that leaked or lost state is off by far more); float64
# would not be tighter: the KDA states and the router are float32 inside
TOLERANCE = 5e-5


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("packed, piece", [(False, 5), (False, 1), (True, 6), (True, 4)],
                         ids=["unpacked-5", "unpacked-1", "packed-6", "packed-4"])
def test_pieces_equal_the_whole_layer(lora, packed, piece):
    model = build(lora, aux=0.01)
    generator = torch.Generator().manual_seed(1)
    if packed:
        input_ids = torch.randint(0, 250, (1, PACKED_BOUNDS[-1]), generator=generator)
        cu_seqlens = torch.tensor(PACKED_BOUNDS, dtype=torch.int32)
    else:
        input_ids, cu_seqlens = torch.randint(0, 250, (2, 23), generator=generator), None
    everything = model.recomputed_layers()
    whole = step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=everything))
    pieces = step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=everything, sequence_piece_len=piece))
    plain = step(model, input_ids, cu_seqlens, RunOptions())
    for name, reference in (("recomputed whole", whole), ("not recomputed", plain)):
        assert_same_step(pieces, reference, f"vs {name}")


def assert_same_step(actual, expected, name):
    """Two ``step`` results equal: loss, aux loss and every gradient to TOLERANCE of their scale, router counts
    exactly."""
    assert_close_to_scale(actual[0], expected[0], TOLERANCE, f"loss {name}")
    assert_close_to_scale(actual[1], expected[1], TOLERANCE, f"aux loss {name}")
    assert torch.equal(actual[2], expected[2]), f"router counts {name}"
    assert actual[3].keys() == expected[3].keys()
    for key in expected[3]:
        assert_close_to_scale(actual[3][key], expected[3][key], TOLERANCE, f"{key} {name}")


def test_a_piece_as_long_as_the_row_is_the_whole_layer():
    model = build(False, aux=0.0)
    input_ids = torch.randint(0, 250, (1, 12))
    options = RunOptions(recompute_layers=model.recomputed_layers(), sequence_piece_len=12)
    loss, _, _, _ = step(model, input_ids, None, options)
    reference, _, _, _ = step(model, input_ids, None, RunOptions(recompute_layers=model.recomputed_layers()))
    assert torch.equal(loss, reference)


def test_piece_layouts():
    layout = BatchLayout.of(torch.tensor(PACKED_BOUNDS, dtype=torch.int32), "cpu")
    pieces = split_into_pieces(layout, 37, 6, torch.device("cpu"))
    assert [(p.start, p.end) for p in pieces] == [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30), (30, 36), (36, 37)]
    assert [p.layout.cu_seqlens_cpu.tolist() for p in pieces] == [
        [0, 3, 6], [0, 6], [0, 5, 6], [0, 6], [0, 6], [0, 6], [0, 1]]
    assert [p.continues for p in pieces] == [False, True, True, False, True, False, True]
    assert [p.carries for p in pieces] == [True, True, False, True, False, True, False]
    assert [p.first_start for p in pieces] == [0, 3, 3, 18, 18, 30, 30]
    # cut once a batch: every layer and recomputation gets the same local layouts (device bounds, fla tables)
    again = split_into_pieces(layout, 37, 6, torch.device("cpu"))
    assert again is pieces and split_into_pieces(layout, 37, 12, torch.device("cpu")) is not pieces
    unpacked = split_into_pieces(None, 11, 4, torch.device("cpu"))
    assert [(p.start, p.end, p.continues, p.carries) for p in unpacked] == [
        (0, 4, False, True), (4, 8, True, True), (8, 11, True, False)]
    with pytest.raises(ValueError, match="at least 1"):
        split_into_pieces(None, 11, 0, torch.device("cpu"))


@pytest.mark.parametrize("segment", [2, 3])
def test_segments_of_recomputed_layers_equal_single_layers(segment):
    """recompute_segment_layers: runs of layers recomputed from one kept input (3 does not divide the 4 layers),
    with and without pieces inside."""
    model = build(lora=True, aux=0.01)
    input_ids = torch.randint(0, 250, (1, PACKED_BOUNDS[-1]), generator=torch.Generator().manual_seed(2))
    cu_seqlens = torch.tensor(PACKED_BOUNDS, dtype=torch.int32)
    everything = model.recomputed_layers()
    reference = step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=everything))
    for piece in (None, 6):
        got = step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=everything, segment_layers=segment,
                                                            sequence_piece_len=piece))
        assert_close_to_scale(got[0], reference[0], TOLERANCE, "loss")
        assert_close_to_scale(got[1], reference[1], TOLERANCE, "aux loss")
        assert torch.equal(got[2], reference[2])
        for key in reference[3]:
            assert_close_to_scale(got[3][key], reference[3][key], TOLERANCE, key)
    with pytest.raises(ValueError, match="needs every decoder layer recomputed"):
        step(model, input_ids, cu_seqlens, RunOptions(recompute_layers=model.recomputed_layers(2), segment_layers=2))


def test_a_segment_keeps_only_its_first_input():
    """What the forward saves: one input per segment (pieces of it), not one per layer."""
    model = build(lora=False, aux=0.0)
    ids = torch.randint(0, 250, (1, 30))
    counts = {}
    for segment in (1, 2, 4):
        seen = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: (seen.append(tuple(t.shape)), t)[1], lambda t: t):
            options = RunOptions(recompute_layers=model.recomputed_layers(), segment_layers=segment)
            out = model(ids, labels=ids, return_logits=False, options=options)
        counts[segment] = seen.count((1, 30, model.config.hidden_size))
        del out
    # per layer (1), per segment of 2, one for all 4 (the final norm's input and the loss's are there each time)
    assert counts[1] - counts[2] == 2 and counts[2] - counts[4] == 1
