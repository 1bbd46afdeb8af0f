"""rl_shared_prompt: preference pairs whose prompt is computed once (kimitune/model/shared_prompts.py) give the
preference sums and gradients of pairs packed whole, the same reference log-probabilities, and the same evaluation;
and what cannot share is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import micro_config, perturb_  # noqa: E402

from kimitune import KimiLinearForCausalLM  # noqa: E402
from kimitune.config import ConfigError, parse_config  # noqa: E402
from kimitune.data.packing import Sample  # noqa: E402
from kimitune.data.preference import PreferencePair, make_preference_batches  # noqa: E402
from kimitune.train.preference import PreferenceSettings, preference_sums  # noqa: E402
from kimitune.train.trainer import REFERENCE_FILE  # noqa: E402

from test_preference_training import pairs_data, raw_config  # noqa: E402,F401
from test_trainer import run  # noqa: E402


def make_pairs(seed: int = 0) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for prompt_len, chosen_len, rejected_len in ((6, 4, 7), (11, 3, 2), (3, 5, 5), (8, 1, 4)):
        prompt = rng.integers(0, 250, prompt_len).astype(np.int32)
        samples = []
        for length in (chosen_len, rejected_len):
            reply = rng.integers(0, 250, length).astype(np.int32)
            samples.append(Sample(np.concatenate([prompt, reply]),
                                  np.concatenate([np.full(prompt_len, -100, dtype=np.int32), reply])))
        pairs.append(PreferencePair(*samples))
    return pairs


@pytest.mark.parametrize("kind", ["dpo", "simpo"])
@pytest.mark.parametrize("row_multiple", [1, 8])
def test_shared_prompt_pairs_give_the_sums_and_gradients_of_whole_pairs(kind, row_multiple):
    pairs = make_pairs()
    settings = PreferenceSettings(kind, beta=0.5, cpo_alpha=0.7)
    reference = torch.randn(len(pairs), 2, generator=torch.Generator().manual_seed(1)) if kind == "dpo" else None
    results = []
    for shared in (False, True):
        (batch,) = make_preference_batches(pairs, 4096, seed=0, epoch=0, row_multiple=row_multiple,
                                           shared_prompts=shared)
        assert batch.prompts == (len(pairs) if shared else 0)
        torch.manual_seed(0)
        model = perturb_(KimiLinearForCausalLM(micro_config()))
        order = reference if reference is None else reference[batch.pair_ids]
        sums, _ = preference_sums(settings, model, batch.input_ids, batch.labels, batch.cu_seqlens, order,
                                  pairs=batch.pair_ids.numel(), prompts=batch.prompts)
        (sums.pair_losses + sums.nll).backward()
        results.append((batch, sums, {n: p.grad for n, p in model.named_parameters()}))
    (whole, expected, expected_grads), (shared_batch, got, got_grads) = results
    assert sorted(whole.pair_ids.tolist()) == sorted(shared_batch.pair_ids.tolist())  # the same pairs, any order
    # the prompts' tokens once: a pair's shared length is its whole one less its prompt, plus one
    assert shared_batch.num_tokens < whole.num_tokens and shared_batch.num_label_tokens == whole.num_label_tokens
    for name in ("pair_losses", "nll", "nll_tokens", "chosen_rewards", "rejected_rewards", "margins", "correct"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        if grad is not None:
            scale = grad.abs().max().item()
            assert (got_grads[name] - grad).abs().max().item() <= 1e-5 * scale + 1e-9, name


def test_a_shared_prompt_run_keeps_the_reference_and_first_evaluation_of_whole_pairs(pairs_data, tmp_path):
    whole, shared = tmp_path / "whole", tmp_path / "shared"
    first = {}
    for folder, flag in ((whole, False), (shared, True)):
        first[flag] = run(raw_config(pairs_data, folder, rl_shared_prompt=flag, save_steps=None)).first_eval_loss
    reference = {flag: torch.load(folder / REFERENCE_FILE) for folder, flag in ((whole, False), (shared, True))}
    torch.testing.assert_close(reference[True]["train"], reference[False]["train"], rtol=1e-5, atol=1e-5)
    assert first[True] == pytest.approx(first[False], rel=1e-5)


def test_what_cannot_share_a_prompt_is_refused(pairs_data, tmp_path):
    with pytest.raises(ConfigError, match="rl dpo, ipo or simpo"):
        parse_config(raw_config(pairs_data, tmp_path, rl="orpo", rl_shared_prompt=True))
    with pytest.raises(ConfigError, match="does not work with context_parallel_size"):
        parse_config(raw_config(pairs_data, tmp_path, rl_shared_prompt=True, context_parallel_size=2))
    (batch,) = make_preference_batches(make_pairs(), 4096, 0, 0, shared_prompts=True)
    with pytest.raises(ValueError, match="no NLL over the whole chosen sequence"):
        preference_sums(PreferenceSettings("orpo", beta=0.1), perturb_(KimiLinearForCausalLM(micro_config())),
                        batch.input_ids, batch.labels, batch.cu_seqlens, None, prompts=batch.prompts)
    pair = make_pairs()[0]
    other = PreferencePair(pair.chosen, Sample(pair.rejected.input_ids[::-1].copy(), pair.rejected.labels))
    with pytest.raises(ValueError, match="pair 1: its chosen and rejected sequences do not share a prompt"):
        make_preference_batches([pair, other], 4096, 0, 0, shared_prompts=True)
