"""``kimitune eval CONFIG``: loss and perplexity on the config's eval split, and exact match of the replies.

The eval split is what training evaluates on (``kimitune.data.prepare_datasets``: ``test_datasets``, or the
``val_set_size`` hold-out), tokenised and batched the same way.

- loss: the mean token cross-entropy over every trained (label) token of the split; perplexity = exp(loss).
- exact match: every trained span of a sample (a run of label tokens: with the default ``roles_to_train`` one
  assistant reply, with its end-of-turn token) is a reference answer. The model generates greedily from the
  tokens before the span (the conversation so far, ending with the template's generation prompt) until its stop
  token or the span's length plus ``EXTRA_TOKENS``; the reply matches when its text equals the span's text
  (special tokens dropped), both stripped of surrounding whitespace. A span at the very start of a sample (no
  conversation before it, e.g. ``train_on_inputs``) is not a reply and is skipped.
"""

from __future__ import annotations

import contextlib

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from kimitune.config import TrainConfig
from kimitune.data import IGNORE_INDEX, Sample, make_batches
from kimitune.infer.generate import generate, stop_token_ids
from kimitune.infer.sampling import SamplingSettings
from kimitune.model import KimiLinearForCausalLM, RunOptions

EXTRA_TOKENS = 8


@dataclass
class ReplyResult:
    """One reference reply: sample index, the span's first token, reference and generated text, match."""

    sample: int
    start: int
    reference: str
    generated: str
    match: bool


@dataclass
class EvalReport:
    """Loss and perplexity over ``label_tokens`` tokens of ``samples`` samples; exact match over ``replies``."""

    samples: int
    label_tokens: int
    loss: float
    perplexity: float
    replies: int = 0
    exact_matches: int = 0
    results: list[ReplyResult] = field(default_factory=list)

    @property
    def exact_match(self) -> float | None:
        return self.exact_matches / self.replies if self.replies else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "exact_match": self.exact_match}


@torch.no_grad()
def summed_loss(model: KimiLinearForCausalLM, batches: list, autocast=None,
                options: RunOptions | None = None) -> tuple[torch.Tensor, int]:
    """(summed token loss over every label token of ``batches`` as a float32 tensor, their number); the model is
    put in eval mode. ``options``: how the passes run (``sequence_piece_len`` bounds a long sample's memory)."""
    model.eval()
    device = model.lm_head.weight.device
    total, count = torch.zeros((), device=device), 0
    for batch in batches:
        with autocast or contextlib.nullcontext():
            out = model(batch.input_ids.to(device), labels=batch.labels.to(device), cu_seqlens=batch.cu_seqlens,
                        return_logits=False, loss_reduction="sum", options=options)
        total += out.loss.float()
        count += batch.num_label_tokens
    return total, count


def mean_loss(model: KimiLinearForCausalLM, batches: list, autocast=None,
              options: RunOptions | None = None) -> tuple[float, int]:
    """(mean loss over every label token of ``batches``, their number); the model is put in eval mode."""
    total, count = summed_loss(model, batches, autocast, options)
    return (total / max(count, 1)).item(), count


def eval_loss(
    model: KimiLinearForCausalLM, samples: list[Sample], config: TrainConfig, pad_id: int
) -> tuple[float, int]:
    """(mean loss over the label tokens, their number), batched as the config batches training data."""
    batches = make_batches(samples, sequence_len=config.sequence_len, micro_batch_size=config.micro_batch_size,
                           sample_packing=config.sample_packing, seed=config.seed, epoch=0, pad_id=pad_id)
    return mean_loss(model, batches, options=RunOptions(sequence_piece_len=config.sequence_piece_len))


def reply_spans(sample: Sample) -> list[tuple[int, int]]:
    """[start, end) of each run of label tokens that has tokens before it."""
    trained = np.concatenate([[False], sample.labels != IGNORE_INDEX, [False]])
    edges = np.flatnonzero(trained[1:] != trained[:-1])
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2]) if s > 0]


def exact_match(
    model: KimiLinearForCausalLM, tokenizer: Any, samples: list[Sample], batch_size: int = 8
) -> list[ReplyResult]:
    """Greedy replies to every reference span of ``samples`` (see the module doc), ``batch_size`` at a time."""
    stop_ids = stop_token_ids(model.config, tokenizer)
    spans = [(i, start, end) for i, sample in enumerate(samples) for start, end in reply_spans(sample)]
    results = []
    for first in range(0, len(spans), batch_size):
        group = spans[first : first + batch_size]
        prompts = [samples[i].input_ids[:start].tolist() for i, start, _ in group]
        longest = max(end - start for _, start, end in group)
        settings = SamplingSettings(temperature=0.0, max_new_tokens=longest + EXTRA_TOKENS)
        for (i, start, end), generation in zip(group, generate(model, prompts, settings, stop_ids)):
            reference = tokenizer.decode(samples[i].input_ids[start:end].tolist(), skip_special_tokens=True).strip()
            generated = tokenizer.decode(generation.tokens, skip_special_tokens=True).strip()
            results.append(ReplyResult(i, start, reference, generated, generated == reference))
    return results


def evaluate(
    model: KimiLinearForCausalLM,
    tokenizer: Any,
    config: TrainConfig,
    samples: list[Sample],
    batch_size: int = 8,
    with_exact_match: bool = True,
) -> EvalReport:
    """Loss, perplexity and (unless ``with_exact_match`` is false) exact match of ``model`` on ``samples``."""
    if not samples:
        raise ValueError("no eval samples: set test_datasets or val_set_size in the config")
    pad = getattr(tokenizer, "pad_token_id", None)
    loss, tokens = eval_loss(model, samples, config, int(pad) if pad is not None else 0)
    report = EvalReport(samples=len(samples), label_tokens=tokens, loss=loss, perplexity=math.exp(min(loss, 700)))
    if with_exact_match:
        report.results = exact_match(model, tokenizer, samples, batch_size)
        report.replies = len(report.results)
        report.exact_matches = sum(r.match for r in report.results)
    return report
