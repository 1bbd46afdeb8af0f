"""Preference losses against TRL 1.16 as the oracle: DPO and IPO through DPOTrainer.compute_loss on the tiny model
(transformers' Kimi Linear and a reference model) and the shipped pairs; SimPO and ORPO through TRL's CPO and ORPO
loss functions called directly; and per-sequence log-probabilities of a packed row of pairs against each sequence run
alone (no state leaks between the packed sequences)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kimitune import KimiLinearForCausalLM
from kimitune.train.preference import PreferenceSettings, nll_weight, pair_terms, sequence_ids, sequence_sums

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from model_helpers import micro_config, perturb_  # noqa: E402

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def pairs(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens_c = torch.randint(3, 40, (n,), generator=g).float()
    tokens_r = torch.randint(3, 40, (n,), generator=g).float()
    chosen, rejected = -tokens_c * torch.rand(n, generator=g) * 3, -tokens_r * torch.rand(n, generator=g) * 3
    ref_c, ref_r = chosen + torch.randn(n, generator=g), rejected + torch.randn(n, generator=g)
    return chosen.double(), rejected.double(), tokens_c.double(), tokens_r.double(), ref_c.double(), ref_r.double()


def trl_self(**values):
    """The attributes TRL's loss methods read from their trainer."""
    return SimpleNamespace(**{"accelerator": SimpleNamespace(device="cpu"), "alpha": 0.0, "label_smoothing": 0.0,
                              **values})


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_equals_trls_cpo_loss(smoothing):
    from trl.experimental.cpo import CPOTrainer

    chosen, rejected, tokens_c, tokens_r, _, _ = pairs()
    settings = PreferenceSettings("simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=smoothing)
    ours = pair_terms(settings, chosen, rejected, tokens_c, tokens_r)
    fake = trl_self(beta=2.0, loss_type="simpo", simpo_gamma=0.7, label_smoothing=smoothing)
    losses, chosen_rewards, rejected_rewards = CPOTrainer.cpo_loss(fake, chosen / tokens_c, rejected / tokens_r)
    torch.testing.assert_close(ours.losses, losses, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards)
    torch.testing.assert_close(ours.rejected_rewards, rejected_rewards)


def test_orpo_equals_trls_odds_ratio_loss():
    from trl.experimental.orpo import ORPOTrainer

    chosen, rejected, tokens_c, tokens_r, _, _ = pairs()
    ours = pair_terms(PreferenceSettings("orpo", beta=0.1), chosen, rejected, tokens_c, tokens_r)
    losses, chosen_rewards, rejected_rewards, _, _ = ORPOTrainer.odds_ratio_loss(
        trl_self(beta=0.1), chosen / tokens_c, rejected / tokens_r)
    torch.testing.assert_close(ours.losses, -losses.double(), rtol=1e-6, atol=1e-7)  # TRL subtracts its mean
    torch.testing.assert_close(ours.chosen_rewards, chosen_rewards.double())
    assert nll_weight(PreferenceSettings("orpo", beta=0.1)) == 1.0


def test_dpo_and_ipo_follow_trls_dpo_trainer():
    """trl/trainer/dpo_trainer.py (1.16), _compute_loss with f_divergence_type reverse_kl: loss_type "sigmoid" is
    -logsigmoid(beta * delta_score), "ipo" ((chosen_scores / chosen tokens - rejected_scores / rejected tokens)
    - 1 / (2 beta))^2, with chosen_scores = chosen_logps - ref_chosen_logps; rewards beta * the log ratios."""
    chosen, rejected, tokens_c, tokens_r, ref_c, ref_r = pairs()
    beta = 0.1
    chosen_scores, rejected_scores = chosen - ref_c, rejected - ref_r
    dpo = pair_terms(PreferenceSettings("dpo", beta=beta), chosen, rejected, tokens_c, tokens_r, ref_c, ref_r)
    torch.testing.assert_close(dpo.losses, -torch.nn.functional.logsigmoid(beta * (chosen_scores - rejected_scores)))
    torch.testing.assert_close(dpo.chosen_rewards, beta * chosen_scores)
    ipo = pair_terms(PreferenceSettings("ipo", beta=beta), chosen, rejected, tokens_c, tokens_r, ref_c, ref_r)
    delta = chosen_scores / tokens_c - rejected_scores / tokens_r
    torch.testing.assert_close(ipo.losses, (delta - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="reference"):
        pair_terms(PreferenceSettings("dpo", beta=beta), chosen, rejected, tokens_c, tokens_r)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="one of"):
        PreferenceSettings("kto2", beta=0.1)
    with pytest.raises(ValueError, match="beta"):
        PreferenceSettings("dpo", beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        PreferenceSettings("simpo", beta=2.0, label_smoothing=0.5)


def test_packed_pairs_give_each_sequence_its_own_log_probability_and_gradient():
    """Two pairs packed in one row (4 sequences with prompts masked) against each sequence run alone: the
    per-sequence log-probabilities and the gradients of a DPO-like weighted sum agree to float32 rounding."""
    torch.manual_seed(0)
    model = perturb_(KimiLinearForCausalLM(micro_config()))
    lengths, prompts = [9, 12, 7, 15], [4, 4, 5, 5]
    sequences = [torch.randint(0, 250, (1, n)) for n in lengths]
    labels = []
    for ids, prompt in zip(sequences, prompts):
        masked = ids.clone()
        masked[:, :prompt] = -100
        labels.append(masked)
    weights = torch.tensor([0.7, -0.7, 1.3, -1.3])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    packed = model(torch.cat(sequences, 1), labels=torch.cat(labels, 1), cu_seqlens=cu, return_logits=False,
                   loss_reduction="none")
    logps = -sequence_sums(packed.loss, sequence_ids(cu, cu[-1].item()), len(lengths))
    (logps * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone = torch.stack([-model(ids, labels=lab, return_logits=False, loss_reduction="sum").loss
                         for ids, lab in zip(sequences, labels)])
    (alone * weights).sum().backward()
    torch.testing.assert_close(logps, alone, rtol=1e-5, atol=1e-5)
    for name, param in model.named_parameters():
        if param.grad is not None:
            scale = param.grad.norm().clamp_min(1e-6)
            assert (packed_grads[name] - param.grad).norm() / scale < 1e-4, name


def packed_pairs(model_seed=0):
    """A micro model and one packed row of 2 pairs (sequences: chosen 0, rejected 0, chosen 1, rejected 1), each pair
    sharing its prompt, with the prompts' labels masked."""
    torch.manual_seed(model_seed)
    model = perturb_(KimiLinearForCausalLM(micro_config()))
    g = torch.Generator().manual_seed(1)
    sequences, labels = [], []
    for prompt_len, replies in ((4, (5, 8)), (6, (3, 9))):
        prompt = torch.randint(0, 250, (1, prompt_len), generator=g)
        for reply_len in replies:
            ids = torch.cat([prompt, torch.randint(0, 250, (1, reply_len), generator=g)], 1)
            masked = ids.clone()
            masked[:, :prompt_len] = -100
            sequences.append(ids)
            labels.append(masked)
    lengths = [s.shape[1] for s in sequences]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return model, sequences, labels, torch.cat(sequences, 1), torch.cat(labels, 1), cu


def test_a_packed_micro_batch_gives_the_losses_of_its_pairs_run_alone():
    from kimitune.train.preference import preference_sums, reference_log_probs

    model, sequences, labels, ids, lab, cu = packed_pairs()
    alone = torch.stack([-model(s, labels=l, return_logits=False, loss_reduction="sum").loss
                         for s, l in zip(sequences, labels)]).detach()
    tokens = torch.tensor([float((l[0, 1:] != -100).sum()) for l in labels])
    batch = SimpleNamespace(input_ids=ids, labels=lab, cu_seqlens=cu, pair_ids=torch.tensor([1, 0]))
    reference = reference_log_probs(model, [batch], num_pairs=2, device="cpu")
    torch.testing.assert_close(reference, alone.view(2, 2)[[1, 0]], rtol=1e-5, atol=1e-5)  # stored by pair id
    shifted = alone.view(2, 2) + torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    for settings in (PreferenceSettings("dpo", beta=0.1), PreferenceSettings("ipo", beta=0.2),
                     PreferenceSettings("simpo", beta=2.0, cpo_alpha=1.0)):
        sums, _ = preference_sums(settings, model, ids, lab, cu, shifted if settings.uses_reference else None)
        expected = pair_terms(settings, alone[0::2], alone[1::2], tokens[0::2], tokens[1::2],
                              shifted[:, 0], shifted[:, 1])
        torch.testing.assert_close(sums.pair_losses, expected.losses.sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sums.correct, (expected.chosen_rewards > expected.rejected_rewards).float().sum())
        assert sums.pairs.item() == 2
        if settings.kind == "simpo":  # CPOTrainer's NLL: the chosen replies' tokens
            torch.testing.assert_close(sums.nll / sums.nll_tokens, -alone[0::2].sum() / tokens[0::2].sum())


def test_orpos_nll_counts_the_whole_chosen_sequence_as_trl_does():
    from kimitune.train.preference import preference_sums

    model, sequences, labels, ids, lab, cu = packed_pairs()
    sums, _ = preference_sums(PreferenceSettings("orpo", beta=0.1), model, ids, lab, cu, None)
    whole = [model(s, labels=s, return_logits=False, loss_reduction="sum").loss for s in sequences[0::2]]
    counts = [s.shape[1] - 1 for s in sequences[0::2]]
    torch.testing.assert_close(sums.nll / sums.nll_tokens, sum(whole) / sum(counts), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def policy_and_reference(tmp_path_factory):
    """The tiny model (examples/models/tiny.json, perturbed) as the policy and a second perturbation of it as the
    reference, saved in the release layout for both kimitune and transformers to load."""
    from kimitune.model import KimiLinearConfig

    folder = tmp_path_factory.mktemp("oracle")
    torch.manual_seed(0)
    model = KimiLinearForCausalLM(KimiLinearConfig.from_pretrained(Path(__file__).resolve().parents[2]
                                                                   / "examples/models/tiny.json"))
    generator = torch.Generator().manual_seed(1)
    for name in ("policy", "reference"):
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        model.save_pretrained(folder / name)
    return folder / "policy", folder / "reference"


def shipped_pairs(count: int = 3) -> list[dict]:
    """The first DPO quickstart pairs, tokenised by kimitune, as TRL's pre-tokenised examples (prompt, chosen and
    rejected ids), so that both tools score the very same tokens."""
    import json as json_module

    from kimitune.config import DatasetConfig
    from kimitune.data import load_tokenizer
    from kimitune.data.preference import row_to_preference, tokenize_pair

    root = Path(__file__).resolve().parents[2]
    tokenizer = load_tokenizer(str(root / "examples/tokenizer"))
    rows = (root / "examples/data/dpo_train.jsonl").read_text().splitlines()[:count]
    examples = []
    for i, line in enumerate(rows):
        pair = tokenize_pair(tokenizer, *row_to_preference(json_module.loads(line), "chat_template.default",
                                                           DatasetConfig(path="x"), f"row {i + 1}"))
        prompt = int((pair.chosen.labels != -100).argmax())
        examples.append({"prompt_ids": pair.chosen.input_ids[:prompt].tolist(),
                         "chosen_ids": pair.chosen.input_ids[prompt:].tolist(),
                         "rejected_ids": pair.rejected.input_ids[prompt:].tolist()})
    return examples


@pytest.mark.parametrize("kind, trl_loss", [("dpo", "sigmoid"), ("ipo", "ipo")])
def test_dpo_and_ipo_equal_trls_dpo_trainer_on_the_tiny_model(policy_and_reference, tmp_path, kind, trl_loss):
    """TRL 1.16's DPOTrainer.compute_loss (transformers' Kimi Linear, a reference model) against kimitune's
    packed pairs (kimitune's model, the reference's log-probabilities computed by it): the same loss."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from kimitune.data import load_tokenizer
    from kimitune.train.preference import preference_sums, reply_log_probs

    policy_dir, reference_dir = policy_and_reference
    examples = shipped_pairs()
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(examples), report_to=[], beta=0.1,
                     loss_type=[trl_loss], use_cpu=True, bf16=False, max_length=None)
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}]),  # unused: ids given
        processing_class=load_tokenizer(str(Path(__file__).resolve().parents[2] / "examples/tokenizer")))
    expected = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()

    sequences, labels = [], []
    for example in examples:
        for reply in (example["chosen_ids"], example["rejected_ids"]):
            sequences += example["prompt_ids"] + reply
            labels += [-100] * len(example["prompt_ids"]) + reply
    lengths = [len(e["prompt_ids"]) + len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids")]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    ids, labels = torch.tensor([sequences]), torch.tensor([labels])
    policy = KimiLinearForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    with torch.no_grad():
        reference = reply_log_probs(KimiLinearForCausalLM.from_pretrained(reference_dir, dtype=torch.float32), ids,
                                    labels, cu)[0].view(-1, 2)
    sums, _ = preference_sums(PreferenceSettings(kind, beta=0.1), policy, ids, labels, cu, reference)
    assert (sums.pair_losses / sums.pairs).item() == pytest.approx(expected, abs=1e-5)


def shipped_unpaired(count: int = 3) -> list[dict]:
    """``shipped_pairs`` as KTO's examples: each pair's chosen reply desirable, its rejected one not, with TRL's KL
    completions (the batch's completions rotated by one)."""
    examples = []
    for pair in shipped_pairs(count):
        examples.append({"prompt_ids": pair["prompt_ids"], "completion_ids": pair["chosen_ids"], "label": True})
        examples.append({"prompt_ids": pair["prompt_ids"], "completion_ids": pair["rejected_ids"], "label": False})
    completions = [e["completion_ids"] for e in examples]
    for example, kl in zip(examples, [completions[-1], *completions[:-1]]):
        example["KL_completion_ids"] = kl
    return examples


@pytest.mark.parametrize("undesirable_weight, swapped", [(1.0, False), (1.5, True)])
def test_kto_equals_trls_kto_trainer_on_the_tiny_model(policy_and_reference, tmp_path, undesirable_weight, swapped):
    """TRL 1.16's KTOTrainer.compute_loss (loss_type kto; transformers' Kimi Linear and a reference model) against
    kimitune's KtoObjective on one packed micro-batch of the same samples, with KL sequences made by kimitune's own
    pairing (with_kl_sequences) and the reference's log-probabilities computed by it: the same loss. With the two
    models swapped the KL estimate is positive (unswapped TRL and kimitune both clamp it to 0)."""
    import numpy as np
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from kimitune.data import Sample, load_tokenizer
    from kimitune.data.preference import UnpairedSample, make_unpaired_batches, with_kl_sequences
    from kimitune.ops import BatchLayout
    from kimitune.train.preference import KtoObjective, reference_log_probs

    policy_dir, reference_dir = policy_and_reference[::-1] if swapped else policy_and_reference
    examples = shipped_unpaired()
    args = KTOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(examples), report_to=[], beta=0.1,
                     undesirable_weight=undesirable_weight, use_cpu=True, bf16=False, max_length=None)
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32), args=args,
        train_dataset=Dataset.from_list([{"prompt": "a", "completion": "b", "label": True}] * 2),  # unused: ids given
        processing_class=load_tokenizer(str(Path(__file__).resolve().parents[2] / "examples/tokenizer")))
    expected = trainer.compute_loss(trainer.model, trainer.data_collator(examples)).item()

    def sample(prompt, reply):
        return Sample(np.array(prompt + reply, np.int32), np.array([-100] * len(prompt) + reply, np.int32))

    samples = with_kl_sequences([UnpairedSample(sample(e["prompt_ids"], e["completion_ids"]), e["label"])
                                 for e in examples], 10**6)
    for ours, theirs in zip(samples, examples):  # the same mismatched pairing as TRL's
        assert ours.kl.input_ids.tolist() == theirs["prompt_ids"] + theirs["KL_completion_ids"]
    (batch,) = make_unpaired_batches(samples, 10**6, seed=0, epoch=0)
    reference = reference_log_probs(KimiLinearForCausalLM.from_pretrained(reference_dir, dtype=torch.float32),
                                    [batch], len(samples), "cpu")
    policy = KimiLinearForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    settings = PreferenceSettings("kto", beta=0.1, undesirable_weight=undesirable_weight)
    objective = KtoObjective(settings, reference)
    kl = objective.begin_step(policy, [batch], "cpu")
    assert (kl.item() > 0.01) if swapped else (kl.item() == 0)
    part = objective(policy, batch, batch.input_ids, BatchLayout.of(batch.cu_seqlens, "cpu"), None, len(samples))
    assert part.loss.item() == pytest.approx(expected, abs=1e-5)
    means = objective.means({name: value.item() for name, value in part.sums.items()})
    assert set(means) == {"rewards/chosen", "rewards/rejected", "rewards/margins", "kl"}
    assert means["kl"] == pytest.approx(kl.item())


def test_kto_terms_follow_the_papers_formula():
    from kimitune.train.preference import kto_terms

    logps, reference = torch.tensor([-3.0, -5.0, -2.0]), torch.tensor([-3.5, -4.0, -2.0])
    desirable, kl = torch.tensor([True, False, True]), torch.tensor(0.2)
    settings = PreferenceSettings("kto", beta=0.5, desirable_weight=2.0, undesirable_weight=0.5)
    losses, rewards = kto_terms(settings, logps, reference, desirable, kl)
    ratio = logps - reference
    expected = torch.stack([2.0 * (1 - torch.sigmoid(0.5 * (ratio[0] - kl))),
                            0.5 * (1 - torch.sigmoid(0.5 * (kl - ratio[1]))),
                            2.0 * (1 - torch.sigmoid(0.5 * (ratio[2] - kl)))])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(rewards, 0.5 * ratio)


def test_kto_inputs_that_cannot_work_are_named():
    import numpy as np

    from kimitune.data import Sample
    from kimitune.data.preference import preference_examples
    from kimitune.train.preference import KtoObjective

    sample = Sample(np.array([1, 2, 3], np.int32), np.array([-100, 2, 3], np.int32))
    with pytest.raises(ValueError, match="3 KTO labels for 2 samples"):
        preference_examples([sample, sample], [True, False, True], 8)
    with pytest.raises(ValueError, match="kto needs the reference"):
        KtoObjective(PreferenceSettings("kto", beta=0.1), None)
    with pytest.raises(ValueError, match="not dpo pairs"):
        KtoObjective(PreferenceSettings("dpo", beta=0.1), torch.zeros(1, 2))
    with pytest.raises(RuntimeError, match="begin_step must run"):
        KtoObjective(PreferenceSettings("kto", beta=0.1), torch.zeros(1, 2))(None, None, None, None, None, 1)
