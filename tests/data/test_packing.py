"""make_batches: packing never splits, mixes or overfills; padding stops at the longest; the order is a function of
(seed, epoch)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import DATA_DIR
from hypothesis import given, settings
from hypothesis import strategies as st

from kimitune.data import (
    IGNORE_INDEX,
    Sample,
    make_batches,
    pack_first_fit_decreasing,
    packing_efficiency,
    tokenize_conversation,
)

PAD = 1023


def random_samples(lengths, seed=0):
    """Samples whose tokens say which sample and position they are (id = 10 * sample + position % 10)."""
    rng = np.random.default_rng(seed)
    samples = []
    for index, length in enumerate(lengths):
        ids = (10 * index + np.arange(length) % 10).astype(np.int32)
        labels = np.where(rng.random(length) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
        samples.append(Sample(ids, labels))
    return samples


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60),
    micro_batch_size=st.integers(1, 3),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 2),
)
def test_packed_batches_hold_every_sample_once_and_whole(lengths, micro_batch_size, seed, epoch):
    sequence_len = 64
    samples = random_samples(lengths)
    batches = make_batches(samples, sequence_len, micro_batch_size, True, seed, epoch, PAD)
    seen = []
    for batch in batches:
        assert batch.input_ids.dtype == torch.long
        assert batch.num_tokens <= micro_batch_size * sequence_len
        if batch.cu_seqlens is None:  # one sample: a dense row, right-padded to a multiple of 128 or the capacity
            width = batch.input_ids.shape[1]
            assert batch.input_ids.shape == batch.labels.shape and batch.input_ids.shape[0] == 1
            assert width == min(-(-batch.num_tokens // 128) * 128, micro_batch_size * sequence_len)
            assert (batch.input_ids[0, batch.num_tokens:] == PAD).all()
            assert (batch.labels[0, batch.num_tokens:] == IGNORE_INDEX).all()
            cu = [0, batch.num_tokens]
        else:
            assert batch.input_ids.shape == batch.labels.shape == (1, batch.num_tokens)
            assert batch.cu_seqlens.dtype == torch.int32 and len(batch.cu_seqlens) > 2
            cu = batch.cu_seqlens.tolist()
        assert cu[0] == 0 and cu[-1] == batch.num_tokens and all(a < b for a, b in zip(cu, cu[1:]))
        for start, end in zip(cu, cu[1:]):
            ids = batch.input_ids[0, start:end].numpy()
            index = int(ids[0]) // 10
            assert np.array_equal(ids, samples[index].input_ids)  # one whole sample between two cuts
            assert np.array_equal(batch.labels[0, start:end].numpy(), samples[index].labels)
            seen.append(index)
        assert batch.num_label_tokens == sum(
            int((batch.labels[0, a + 1 : b] != IGNORE_INDEX).sum()) for a, b in zip(cu, cu[1:])
        )
    assert sorted(seen) == list(range(len(samples)))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(1, 100), min_size=1, max_size=200), capacity=st.integers(100, 300))
def test_first_fit_decreasing_is_first_fit(lengths, capacity):
    """Against a direct O(n * bins) first-fit-decreasing."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    expected: list[list[int]] = []
    for i in order:
        for group in expected:
            if sum(lengths[j] for j in group) + lengths[i] <= capacity:
                group.append(i)
                break
        else:
            expected.append([i])
    assert pack_first_fit_decreasing(lengths, capacity) == expected


def test_same_seed_and_epoch_give_the_same_batches_and_others_differ():
    samples = random_samples(np.random.default_rng(1).integers(5, 60, size=300).tolist())
    for packing in (True, False):
        first = make_batches(samples, 64, 2, packing, seed=3, epoch=1, pad_id=PAD)
        again = make_batches(samples, 64, 2, packing, seed=3, epoch=1, pad_id=PAD)
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(first, again)) and len(first) == len(again)
        for seed, epoch in ((3, 2), (4, 1)):
            other = make_batches(samples, 64, 2, packing, seed=seed, epoch=epoch, pad_id=PAD)
            assert [b.input_ids.tolist() for b in other] != [b.input_ids.tolist() for b in first]


def test_padding_to_the_longest_of_the_batch():
    samples = random_samples([3, 7, 5, 2, 4])
    batches = make_batches(samples, 16, 2, False, seed=0, epoch=0, pad_id=PAD)
    assert [b.input_ids.shape[0] for b in batches] == [2, 2, 1]
    rows = []
    for batch in batches:
        assert batch.cu_seqlens is None
        lengths = [int((row != PAD).sum()) for row in batch.input_ids]
        assert batch.input_ids.shape[1] == max(lengths)  # never past the longest
        assert batch.num_tokens == sum(lengths)
        for row, length in enumerate(lengths):
            sample = samples[int(batch.input_ids[row, 0]) // 10]
            assert batch.input_ids[row, :length].tolist() == sample.input_ids.tolist()
            assert (batch.input_ids[row, length:] == PAD).all() and (batch.labels[row, length:] == IGNORE_INDEX).all()
            rows.append(int(batch.input_ids[row, 0]) // 10)
    assert sorted(rows) == [0, 1, 2, 3, 4]


def test_pad_to_sequence_len_fixes_the_shapes():
    samples = random_samples([3, 7, 5, 2, 4])
    for batch in make_batches(samples, 16, 2, False, seed=0, epoch=0, pad_id=PAD, pad_to_sequence_len=True):
        assert batch.input_ids.shape[1] == 16
    for batch in make_batches(samples, 8, 2, True, seed=0, epoch=0, pad_id=PAD, pad_to_sequence_len=True):
        assert batch.input_ids.shape == (1, 16)
        cu = batch.cu_seqlens.tolist()
        assert cu[-1] == 16
        if batch.num_tokens < 16:  # the padding is a sequence of its own
            assert cu[-2] == batch.num_tokens
            assert (batch.input_ids[0, batch.num_tokens :] == PAD).all()
            assert (batch.labels[0, batch.num_tokens :] == IGNORE_INDEX).all()


def test_too_long_samples_are_refused():
    with pytest.raises(ValueError, match="9 tokens > 8"):
        make_batches(random_samples([9]), 8, 1, False, seed=0, epoch=0, pad_id=PAD)
    with pytest.raises(ValueError, match="does not fit"):
        pack_first_fit_decreasing([9], 8)


@pytest.fixture(scope="module")
def quickstart_samples(tokenizer):
    samples = []
    for row in (DATA_DIR / "quickstart_train.jsonl").read_text().splitlines():
        out = tokenize_conversation(tokenizer, json.loads(row)["messages"])
        samples.append(Sample(np.array(out["input_ids"], np.int32), np.array(out["labels"], np.int32)))
    return samples


@pytest.mark.parametrize(("sequence_len", "micro_batch_size"), [(512, 1), (256, 2), (256, 8), (1024, 1), (2048, 2)])
def test_quickstart_packs_at_least_95_percent(quickstart_samples, sequence_len, micro_batch_size):
    batches = make_batches(quickstart_samples, sequence_len, micro_batch_size, True, seed=0, epoch=0, pad_id=PAD)
    assert packing_efficiency(batches, micro_batch_size * sequence_len) >= 0.95


@pytest.mark.parametrize("packing", [True, False])
def test_row_multiple_pads_every_row_to_a_multiple_without_changing_its_samples(packing):
    """Context parallelism splits rows evenly: with row_multiple 4 every row's width is a multiple of 4, the real
    tokens and their labels are the batches' without it, and the padding has no loss (packed: a sequence of its
    own)."""
    samples = random_samples([3, 7, 5, 2, 4, 9, 6])
    plain = make_batches(samples, 16, 2, packing, seed=0, epoch=0, pad_id=PAD)
    split = make_batches(samples, 16, 2, packing, seed=0, epoch=0, pad_id=PAD, row_multiple=4)
    assert len(plain) == len(split)
    for a, b in zip(plain, split):
        assert b.input_ids.shape[1] % 4 == 0 and b.num_tokens == a.num_tokens
        assert b.num_label_tokens == a.num_label_tokens
        width = a.input_ids.shape[1]
        assert torch.equal(b.input_ids[:, :width], a.input_ids) and torch.equal(b.labels[:, :width], a.labels)
        assert (b.labels[:, width:] == IGNORE_INDEX).all()
        if b.cu_seqlens is not None:
            assert b.cu_seqlens[-1] == b.input_ids.shape[1]
            assert b.cu_seqlens.tolist()[: len(a.cu_seqlens)] == a.cu_seqlens.tolist()
