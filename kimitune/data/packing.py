"""Tokenised samples to micro-batches: first-fit-decreasing packing with ``cu_seqlens``, or right padding.

Packed (``sample_packing: true``): samples go into bins of ``micro_batch_size * sequence_len`` tokens by
first-fit-decreasing; each bin is one batch row ``[1, total]`` with ``cu_seqlens`` (int32 ``[n+1]``, from 0) marking
where each sample starts, the model's packed format. A sample is never split across bins or mixed with another.
A bin that holds one sample is a right-padded row ``[1, L]`` instead (``cu_seqlens`` None, ``L`` the sample's length
rounded up to ``DENSE_ROW_MULTIPLE``, or the padded length): the layers' dense kernels are faster than their varlen
ones on a GPU (fused attention about 2x), and rounding keeps the number of distinct shapes small, as each new shape
costs the attention kernels a plan.

Padded (``sample_packing: false``): ``micro_batch_size`` samples per batch, right-padded with ``pad_id`` to the longest
of the batch (to ``sequence_len`` with ``pad_to_sequence_len``), labels -100 on pads, ``cu_seqlens`` None.

The order is a function of ``(seed, epoch)`` alone, so the data position of a run is ``(epoch, batch index)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kimitune.data.chat import IGNORE_INDEX


@dataclass(frozen=True)
class Sample:
    """One tokenised conversation: ``input_ids`` and ``labels`` ``[L]`` (int32, labels -100 where untrained)."""

    input_ids: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Batch:
    """One micro-batch.

    ``input_ids``/``labels``: LongTensor ``[1, total]`` packed or ``[B, L]`` padded. ``cu_seqlens``: int32 ``[n+1]``
    sequence starts for packed batches, else None. ``num_tokens``: real (non-pad) tokens. ``num_label_tokens``: the
    tokens the loss is computed on: labels other than -100, not counting each sequence's first position (nothing
    predicts it once the model shifts the labels).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor | None
    num_tokens: int
    num_label_tokens: int


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``capacity`` tokens, first-fit-decreasing.

    Items are taken longest first (ties in the given order) and each goes into the first bin with room; a max
    segment tree over the bins' free space finds that bin in O(log n).
    """
    if any(length > capacity for length in lengths):
        raise ValueError(f"a sample of {max(lengths)} tokens does not fit a bin of {capacity}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    size = 1
    while size < max(len(lengths), 1):
        size *= 2
    free = [capacity] * (2 * size)  # leaves: free space of bin j at free[size + j]; unopened bins are empty bins
    bins: list[list[int]] = []
    for index in order:
        need = lengths[index]
        node = 1
        while node < size:
            node = 2 * node if free[2 * node] >= need else 2 * node + 1
        slot = node - size
        if slot == len(bins):
            bins.append([])
        bins[slot].append(index)
        free[node] -= need
        node //= 2
        while node:
            free[node] = max(free[2 * node], free[2 * node + 1])
            node //= 2
    return bins


def pack_epoch(lengths: Sequence[int], capacity: int, seed: int, epoch: int) -> list[list[int]]:
    """The packed batches of one epoch as lists of sample indices.

    The samples are shuffled by ``(seed, epoch)`` before first-fit-decreasing, so that equal lengths pack with
    different partners each epoch, and the bins are shuffled after it.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    packed = pack_first_fit_decreasing([lengths[i] for i in order], capacity)
    bins = [[int(order[i]) for i in group] for group in packed]
    return [bins[i] for i in rng.permutation(len(bins))]


DENSE_ROW_MULTIPLE = 128


def _label_tokens(labels: np.ndarray) -> int:
    return int(np.count_nonzero(labels[1:] != IGNORE_INDEX))


def packed_batch(samples: Sequence[Sample], pad_to: int | None, pad_id: int, row_multiple: int = 1) -> Batch:
    """``samples`` end to end in one row [1, total] with their ``cu_seqlens``; ``pad_to``: padded to that many
    tokens with ``pad_id`` (the padding a sequence of its own, after the samples, with no loss); ``row_multiple``:
    padded (further) to a multiple of it."""
    lengths = [len(s) for s in samples]
    input_ids = np.concatenate([s.input_ids for s in samples]).astype(np.int64)
    labels = np.concatenate([s.labels for s in samples]).astype(np.int64)
    num_tokens = len(input_ids)
    width = round_up(max(pad_to or 0, num_tokens), row_multiple)
    if width > num_tokens:
        # The padding becomes a sequence of its own, so that no real token attends to it.
        lengths.append(width - num_tokens)
        input_ids = np.concatenate([input_ids, np.full(width - num_tokens, pad_id, dtype=np.int64)])
        labels = np.concatenate([labels, np.full(width - num_tokens, IGNORE_INDEX, dtype=np.int64)])
    cu_seqlens = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    return Batch(
        input_ids=torch.from_numpy(input_ids)[None],
        labels=torch.from_numpy(labels)[None],
        cu_seqlens=cu_seqlens,
        num_tokens=num_tokens,
        num_label_tokens=sum(_label_tokens(s.labels) for s in samples),
    )


def _padded_batch(samples: Sequence[Sample], pad_to: int | None, pad_id: int) -> Batch:
    width = pad_to if pad_to is not None else max(len(s) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample)] = torch.from_numpy(sample.input_ids.astype(np.int64))
        labels[row, : len(sample)] = torch.from_numpy(sample.labels.astype(np.int64))
    return Batch(
        input_ids=input_ids,
        labels=labels,
        cu_seqlens=None,
        num_tokens=sum(len(s) for s in samples),
        num_label_tokens=sum(_label_tokens(s.labels) for s in samples),
    )


def round_up(n: int, multiple: int) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


def _dense_width(length: int, capacity: int) -> int:
    """A one-sample row's width: ``length`` rounded up to ``DENSE_ROW_MULTIPLE``, at most ``capacity``."""
    return min(round_up(length, DENSE_ROW_MULTIPLE), max(capacity, length))


def make_batches(
    samples: Sequence[Sample],
    sequence_len: int,
    micro_batch_size: int,
    sample_packing: bool,
    seed: int,
    epoch: int,
    pad_id: int,
    pad_to_sequence_len: bool = False,
    row_multiple: int = 1,
) -> list[Batch]:
    """All micro-batches of one epoch, in order; deterministic for ``(seed, epoch)``.

    Every sample must hold at most ``sequence_len`` tokens (``prepare_datasets`` guarantees it).
    ``pad_to_sequence_len`` gives every batch the same shape: ``[1, micro_batch_size * sequence_len]`` packed
    (the padding is a sequence of its own in ``cu_seqlens``) or ``[B, sequence_len]`` padded. ``row_multiple``: every
    row is padded to a multiple of it (context parallelism splits rows evenly over that many ranks).
    """
    if not samples:
        raise ValueError("make_batches: no samples")
    too_long = [i for i, s in enumerate(samples) if len(s) > sequence_len]
    if too_long:
        raise ValueError(f"make_batches: sample {too_long[0]} has {len(samples[too_long[0]])} tokens > {sequence_len}")
    if sample_packing:
        capacity = micro_batch_size * sequence_len
        pad_to = round_up(capacity, row_multiple) if pad_to_sequence_len else None
        bins = pack_epoch([len(s) for s in samples], capacity, seed, epoch)
        batches = []
        for group in bins:
            if len(group) > 1:
                batches.append(packed_batch([samples[i] for i in group], pad_to, pad_id, row_multiple))
            else:
                width = pad_to or round_up(_dense_width(len(samples[group[0]]), capacity), row_multiple)
                batches.append(_padded_batch([samples[group[0]]], width, pad_id))
        return batches
    order = np.random.default_rng([seed, epoch]).permutation(len(samples))
    pad_to = sequence_len if pad_to_sequence_len else None
    groups = [[samples[int(i)] for i in order[start : start + micro_batch_size]]
              for start in range(0, len(order), micro_batch_size)]
    return [_padded_batch(group, round_up(pad_to or max(len(s) for s in group), row_multiple), pad_id)
            for group in groups]


def packing_efficiency(batches: Sequence[Batch], capacity: int) -> float:
    """Real tokens over the slots of ``len(batches)`` bins of ``capacity`` tokens."""
    return sum(b.num_tokens for b in batches) / (len(batches) * capacity)
