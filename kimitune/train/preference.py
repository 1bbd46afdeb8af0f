"""Preference losses on the log-probabilities of whole replies: DPO, IPO, SimPO, ORPO and KTO (issue 26).

A packed preference row holds pairs as adjacent sequences, pair k's chosen reply at sequence 2k and its rejected one
at 2k + 1 (``kimitune.data.preference``). The model gives each token's loss (``loss_reduction="none"``: position t's
loss is that of predicting token t + 1, 0 where the label is -100); ``sequence_sums`` adds them up per sequence, and
a reply's log-probability is minus its sum over the reply's tokens (the prompt's labels are -100).

Per pair (tensors [n], float32): ``chosen`` / ``rejected`` the policy's reply log-probabilities, ``chosen_tokens`` /
``rejected_tokens`` their token counts, ``reference_chosen`` / ``reference_rejected`` the reference model's (DPO and
IPO only). The formulas are TRL 1.16's, which the tests hold them to:

    dpo     -log sigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))   (DPOTrainer, loss_type sigmoid)
    ipo     (((chosen - ref_chosen) / chosen_tokens - (rejected - ref_rejected) / rejected_tokens) - 1 / (2 beta))^2
    simpo   -log sigmoid(beta * (chosen / chosen_tokens - rejected / rejected_tokens) - gamma), label smoothing
            as CPOTrainer's; plus cpo_alpha * the chosen replies' mean token NLL (CPOTrainer, loss_type simpo)
    orpo    the chosen sequences' mean token NLL - beta * log sigmoid(log odds(chosen avg) - log odds(rejected avg)),
            log odds(p) = p - log(1 - exp(p)) on average token log-probabilities; TRL's ORPOTrainer takes that NLL
            over the whole chosen sequence, prompt included

Rewards (logged): beta * (policy - reference) for DPO and IPO, beta * the average log-probability for SimPO and
ORPO, as TRL logs them.

KTO (TRL 1.16's KTOTrainer, loss_type kto) scores unpaired samples (``kimitune.data.preference.UnpairedBatch``),
each with a ``desirable`` label, a reference log-probability and a KL sequence (its prompt with another sample's
reply) with its own reference log-probability:

    kl      max(0, mean over the step's KL sequences of (policy - reference)), without gradient
    kto     desirable: desirable_weight * (1 - sigmoid(beta * ((logp - ref) - kl)));
            undesirable: undesirable_weight * (1 - sigmoid(beta * (kl - (logp - ref)))); the mean over the samples

TRL estimates ``kl`` per micro-batch (averaged over the ranks); kimitune over the whole step's samples (every
micro-batch, every rank), the same number when a step is one micro-batch, and a steadier one otherwise. Rewards:
beta * (logp - ref), their means over the desirable and the undesirable samples.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kimitune.model.options import RunOptions

PAIR_LOSSES = ("dpo", "ipo", "simpo", "orpo")
UNPAIRED_LOSSES = ("kto",)
USES_REFERENCE = ("dpo", "ipo", "kto")


@dataclass(frozen=True)
class PreferenceSettings:
    """What a preference run optimises: ``kind`` one of ``PAIR_LOSSES`` or ``UNPAIRED_LOSSES``; ``beta`` (Axolotl's
    ``rl_beta``, or ``orpo_alpha`` for ORPO); ``simpo_gamma``, ``cpo_alpha`` and ``label_smoothing`` as TRL's
    CPOConfig (SimPO); ``desirable_weight`` and ``undesirable_weight`` as TRL's KTOConfig."""

    kind: str
    beta: float
    simpo_gamma: float = 0.5
    cpo_alpha: float = 0.0
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in PAIR_LOSSES + UNPAIRED_LOSSES:
            raise ValueError(f"preference loss must be one of {PAIR_LOSSES + UNPAIRED_LOSSES}, got {self.kind!r}")
        if self.beta <= 0:
            raise ValueError(f"the preference loss's beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    @property
    def uses_reference(self) -> bool:
        return self.kind in USES_REFERENCE

    @property
    def unpaired(self) -> bool:
        """Whether the data are unpaired samples with labels (KTO), not pairs."""
        return self.kind in UNPAIRED_LOSSES

    @property
    def nll_over_whole_chosen(self) -> bool:
        """ORPO's NLL term counts the chosen sequence's prompt tokens too (TRL's ORPOTrainer)."""
        return self.kind == "orpo"

    @property
    def uses_nll(self) -> bool:
        return self.kind == "orpo" or (self.kind == "simpo" and self.cpo_alpha != 0)


def preference_settings(config) -> PreferenceSettings:
    """The ``PreferenceSettings`` of a ``TrainConfig`` with ``rl`` set: beta from rl_beta (ORPO: orpo_alpha, else
    rl_beta), 0.1 unless set, as TRL's configs."""
    beta = config.rl_beta
    if config.rl == "orpo" and config.orpo_alpha is not None:
        beta = config.orpo_alpha
    return PreferenceSettings(config.rl, beta=0.1 if beta is None else beta, simpo_gamma=config.simpo_gamma,
                              cpo_alpha=config.cpo_alpha if config.rl == "simpo" else 0.0,
                              label_smoothing=config.rl_label_smoothing,
                              desirable_weight=config.kto_desirable_weight,
                              undesirable_weight=config.kto_undesirable_weight)


@dataclass
class PairTerms:
    """Per pair, float32 [n]: ``losses`` (the preference term, before the mean over pairs), ``chosen_rewards`` and
    ``rejected_rewards`` (detached, for the metrics)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """int64 [total] on ``cu_seqlens``' device: the packed sequence each token belongs to."""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def sequence_sums(token_values: torch.Tensor, ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """token_values [T] -> float32 [num_sequences]: the sum of each sequence's tokens (``ids`` [T] from
    ``sequence_ids``)."""
    sums = torch.zeros(num_sequences, dtype=torch.float32, device=token_values.device)
    return sums.index_add(0, ids, token_values.float())


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2 (as TRL's ORPOTrainer)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def pair_terms(settings: PreferenceSettings, chosen: torch.Tensor, rejected: torch.Tensor,
               chosen_tokens: torch.Tensor, rejected_tokens: torch.Tensor,
               reference_chosen: torch.Tensor | None = None,
               reference_rejected: torch.Tensor | None = None) -> PairTerms:
    """Each pair's preference term and rewards; see the module docstring for the formulas."""
    beta = settings.beta
    if settings.uses_reference:
        if reference_chosen is None or reference_rejected is None:
            raise ValueError(f"{settings.kind} needs the reference model's log-probabilities")
        chosen_ratio, rejected_ratio = chosen - reference_chosen, rejected - reference_rejected
        if settings.kind == "dpo":
            losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
        else:
            delta = chosen_ratio / chosen_tokens.clamp_min(1) - rejected_ratio / rejected_tokens.clamp_min(1)
            losses = (delta - 1 / (2 * beta)) ** 2
        return PairTerms(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    chosen_mean = chosen / chosen_tokens.clamp_min(1)
    rejected_mean = rejected / rejected_tokens.clamp_min(1)
    if settings.kind == "simpo":
        margin = beta * (chosen_mean - rejected_mean) - settings.simpo_gamma
        eps = settings.label_smoothing
        losses = -F.logsigmoid(margin) * (1 - eps) - F.logsigmoid(-margin) * eps
    else:  # orpo
        log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
        losses = -beta * F.logsigmoid(log_odds)
    return PairTerms(losses, beta * chosen_mean.detach(), beta * rejected_mean.detach())


def nll_weight(settings: PreferenceSettings) -> float:
    """The weight of the chosen tokens' mean NLL in the loss: 1 for ORPO, cpo_alpha for SimPO, else 0."""
    if settings.kind == "orpo":
        return 1.0
    return settings.cpo_alpha if settings.kind == "simpo" else 0.0


@dataclass
class PreferenceSums:
    """One micro-batch's sums, float32 scalars on the device (a step divides them by the step's counts):
    ``pair_losses`` (the preference terms), ``nll`` and ``nll_tokens`` (the chosen sequences' token NLL and its
    token count, for ORPO and SimPO's cpo_alpha), ``chosen_rewards`` / ``rejected_rewards`` / ``margins``,
    ``correct`` (pairs whose chosen reward is the higher) and ``pairs``."""

    pair_losses: torch.Tensor
    nll: torch.Tensor
    nll_tokens: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    correct: torch.Tensor
    pairs: torch.Tensor


def reply_log_probs(model, input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens, options=None,
                    whole_chosen_nll: bool = False, sequences: int | None = None, prompts: int = 0):
    """One packed row of pairs (``input_ids`` / ``labels`` [1, T] on the model's device, ``cu_seqlens`` int32
    [2n + 1] on the host or the batch's ``BatchLayout``; pair k's chosen sequence at 2k, its rejected at 2k + 1) ->
    (reply log-probabilities [2n], reply token counts [2n], the chosen sequences' summed NLL over every token
    (prompt included) or None, its token count or None, the model's load-balancing loss or None).

    With ``whole_chosen_nll`` the model scores every token (ORPO needs the prompt's too); else only the replies'.
    ``sequences``: the row's real sequences (2n), where padding follows them as one more (context parallelism); None:
    all of the layout's. Under ``options.context_parallel`` each rank scores its share of the row and the sums are
    made whole on every rank (with their gradients): every rank returns the same values. ``prompts``: n when the
    row's pairs share their prompts (``PreferenceBatch.prompts``: n prompt sequences first, the replies after them;
    the model then runs with ``RunOptions.prompt_sequences``); not with ``whole_chosen_nll``."""
    from kimitune.model.context_parallel import own_span, sum_over_ranks
    from kimitune.model.modeling import shift_labels  # the model's own shift: a sequence's last token predicts nothing
    from kimitune.ops import BatchLayout

    if prompts and whole_chosen_nll:
        raise ValueError("shared prompts score the replies alone: no NLL over the whole chosen sequence (ORPO)")
    if prompts:
        options = replace(options or RunOptions(), prompt_sequences=prompts)
    layout = BatchLayout.of(cu_seqlens, input_ids.device, input_ids.shape[1])
    counted = layout.host_bounds.numel() - 1
    sequences = counted - prompts if sequences is None else sequences
    mine = own_span(layout.total, options)
    reply = (shift_labels(labels, layout).reshape(-1) != -100)[mine]
    scored = input_ids if whole_chosen_nll else labels
    out = model(input_ids, labels=scored, cu_seqlens=layout, return_logits=False, loss_reduction="none",
                options=options)
    ids = sequence_ids(layout.cu_seqlens, layout.total)[mine]
    token_losses = out.loss
    logps = sum_over_ranks(-sequence_sums(token_losses * reply, ids, counted), options)[prompts:prompts + sequences]
    tokens = sum_over_ranks(sequence_sums(reply.float(), ids, counted), options)[prompts:prompts + sequences]
    nll = nll_tokens = None
    if whole_chosen_nll:
        scored_tokens = (shift_labels(input_ids, layout).reshape(-1) != -100)[mine]
        chosen_token = (ids % 2 == 0) & (ids < sequences) & scored_tokens
        nll = sum_over_ranks((token_losses * chosen_token).sum(), options)
        nll_tokens = sum_over_ranks(chosen_token.sum().float(), options)
    return logps, tokens, nll, nll_tokens, out.aux_loss


def preference_sums(settings: PreferenceSettings, model, input_ids: torch.Tensor, labels: torch.Tensor,
                    cu_seqlens: torch.Tensor, reference: torch.Tensor | None, options=None, pairs: int | None = None,
                    prompts: int = 0):
    """One micro-batch's ``PreferenceSums`` and the model's load-balancing loss (or None). ``reference``: float32
    [n, 2] on the device, the reference log-probabilities of the batch's pairs (chosen, rejected), or None for
    losses without a reference. ``pairs``: the row's n, where padding follows the pairs (None: every sequence is a
    pair's). ``prompts``: as ``reply_log_probs`` takes it."""
    logps, tokens, nll, nll_tokens, aux_loss = reply_log_probs(
        model, input_ids, labels, cu_seqlens, options, whole_chosen_nll=settings.nll_over_whole_chosen,
        sequences=None if pairs is None else 2 * pairs, prompts=prompts)
    chosen, rejected = logps[0::2], logps[1::2]
    reference_chosen, reference_rejected = (None, None) if reference is None else (reference[:, 0], reference[:, 1])
    terms = pair_terms(settings, chosen, rejected, tokens[0::2], tokens[1::2], reference_chosen, reference_rejected)
    if settings.uses_nll and nll is None:  # SimPO's NLL is the chosen replies' (CPOTrainer masks the prompt)
        nll, nll_tokens = -chosen.sum(), tokens[0::2].sum()
    # Device scalars made by kernels, not copied from the host: a copy from pageable memory would wait for the GPU.
    zero = torch.zeros((), device=logps.device)
    margins = terms.chosen_rewards - terms.rejected_rewards
    sums = PreferenceSums(
        pair_losses=terms.losses.sum(),
        nll=zero if nll is None else nll,
        nll_tokens=zero if nll_tokens is None else nll_tokens,
        chosen_rewards=terms.chosen_rewards.sum(),
        rejected_rewards=terms.rejected_rewards.sum(),
        margins=margins.sum(),
        correct=(margins > 0).float().sum(),
        pairs=torch.full((), float(chosen.numel()), device=logps.device),
    )
    return sums, aux_loss


@torch.no_grad()
def reference_log_probs(model, batches, num_pairs: int, device, options=None) -> torch.Tensor:
    """float32 [num_pairs, 2] on the host: every pair's (chosen, rejected) reply log-probability under ``model`` as
    it is now, in eval mode. Run before the first step, this is the reference: a new LoRA adapter adds exactly
    zero (its B is zero) and full fine-tuning starts from the base weights, so no second copy of the model is
    needed; the result is kept with the run (a resumed run reads it back, its model having moved on).
    ``batches``: objects with input_ids, labels, cu_seqlens and pair_ids (int64 [n], indices into the result), or
    KTO's ``UnpairedBatch`` (sample_ids; ``kl``): then a row holds (the sample's, its KL sequence's)."""
    was_training = model.training
    model.eval()
    result = torch.full((num_pairs, 2), float("nan"))

    def scored(rows, sequences: int) -> torch.Tensor:
        return reply_log_probs(model, rows.input_ids.to(device), rows.labels.to(device), rows.cu_seqlens,
                               options, sequences=sequences, prompts=getattr(rows, "prompts", 0))[0].float().cpu()

    try:
        for batch in batches:
            if hasattr(batch, "sample_ids"):
                n = batch.sample_ids.numel()
                result[batch.sample_ids] = torch.stack([scored(batch, n), scored(batch.kl, n)], dim=1)
            else:
                result[batch.pair_ids] = scored(batch, 2 * batch.pair_ids.numel()).view(-1, 2)
    finally:
        model.train(was_training)
    if torch.isnan(result).any():
        missing = torch.isnan(result[:, 0]).nonzero().flatten()[:5].tolist()
        raise ValueError(f"reference log-probabilities missing for examples {missing}: every example must be in a "
                         "batch")
    return result


@dataclass(frozen=True)
class PairCounts:
    """A step's counts over its global batch: ``pairs``, and ``nll_tokens`` (the tokens of the chosen NLL term)."""

    pairs: int
    nll_tokens: int


METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


class PreferenceObjective:
    """A preference run's objective for ``kimitune.train.step.TrainStep``: the mean of the pairs' terms over the
    global batch, plus the chosen tokens' mean NLL times ``nll_weight``. ``reference``: float32 [num_pairs, 2]
    (host), every training pair's reference log-probabilities by pair id (``reference_log_probs``), or None for
    losses without one. Its step ``sums`` are ``FIGURES``: ``METRICS``' numerators and ``pairs``."""

    FIGURES = (*METRICS, "pairs")

    def __init__(self, settings: PreferenceSettings, reference: torch.Tensor | None = None) -> None:
        if settings.uses_reference and reference is None:
            raise ValueError(f"{settings.kind} needs the reference log-probabilities of the training pairs")
        self.settings, self.reference = settings, reference
        self.nll_weight = nll_weight(settings)

    def denominator(self, batches) -> PairCounts:
        """The pairs of ``batches`` (every rank's micro-batches of the step) and their NLL tokens, from the host."""
        from kimitune.model.modeling import shift_labels

        pairs = sum(b.pair_ids.numel() for b in batches)
        if not self.nll_weight:
            return PairCounts(pairs, 0)
        tokens = 0
        for b in batches:
            scored = b.input_ids if self.settings.nll_over_whole_chosen else b.labels
            ids = sequence_ids(b.cu_seqlens, b.input_ids.shape[1]) - b.prompts  # replies from 0 (prompts: < 0)
            chosen = (ids % 2 == 0) & (ids >= 0) & (ids < 2 * b.pair_ids.numel())  # not the padding after them
            tokens += int(((shift_labels(scored, b.cu_seqlens)[0] != -100) & chosen).sum())
        return PairCounts(pairs, tokens)

    def __call__(self, model, batch, input_ids: torch.Tensor, layout, options, counts: PairCounts):
        from kimitune.train.step import MicroBatchLoss, to_device

        reference = None
        if self.settings.uses_reference:
            reference = to_device(self.reference[batch.pair_ids], input_ids.device)
        sums, aux_loss = preference_sums(self.settings, model, input_ids, to_device(batch.labels, input_ids.device),
                                         layout, reference, options, pairs=batch.pair_ids.numel(),
                                         prompts=batch.prompts)
        loss = sums.pair_losses / max(counts.pairs, 1)
        if self.nll_weight:
            loss = loss + self.nll_weight * sums.nll / max(counts.nll_tokens, 1)
        figures = {"rewards/chosen": sums.chosen_rewards, "rewards/rejected": sums.rejected_rewards,
                   "rewards/margins": sums.margins, "rewards/accuracies": sums.correct, "pairs": sums.pairs}
        return _rank_share(MicroBatchLoss(loss, loss.detach().float(), figures, aux_loss), options)

    @staticmethod
    def means(sums: dict[str, float]) -> dict[str, float]:
        """``METRICS`` as means over the pairs from a step's (or a window's) summed ``FIGURES``."""
        pairs = max(sums.get("pairs", 0.0), 1.0)
        return {name: sums[name] / pairs for name in METRICS if name in sums}


def _rank_share(part, options):
    """A micro-batch's loss and figures as one rank's share: under context parallelism every rank of the group has
    computed the same whole-row values (``reply_log_probs``), which the step sums over every rank; a rank's share
    is 1 / the group's size (its gradients, summed back over the group, are then the row's)."""
    from kimitune.model.context_parallel import context_ranks

    ranks = context_ranks(options)
    if ranks == 1:
        return part
    part.loss, part.reported = part.loss / ranks, part.reported / ranks
    part.sums = {name: value / ranks for name, value in part.sums.items()}
    return part


def kto_terms(settings: PreferenceSettings, logps: torch.Tensor, reference: torch.Tensor, desirable: torch.Tensor,
              kl: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample (``logps``, ``reference`` float32 [n], ``desirable`` bool [n], ``kl`` a detached scalar): the KTO
    losses [n] (the module docstring's formula, weights included) and the rewards [n] (detached)."""
    ratio = logps - reference
    desired = settings.desirable_weight * (1 - torch.sigmoid(settings.beta * (ratio - kl)))
    undesired = settings.undesirable_weight * (1 - torch.sigmoid(settings.beta * (kl - ratio)))
    return torch.where(desirable, desired, undesired), settings.beta * ratio.detach()


class KtoObjective:
    """KTO's objective for ``TrainStep``: the mean of the samples' ``kto_terms`` over the global batch, with the KL
    estimate of the step (``begin_step``, which the step runs first: the KL sequences of all its micro-batches scored
    without gradients, summed over the ranks). ``reference``: float32 [num_samples, 2] (host), each sample's and
    its KL sequence's reference log-probabilities by sample id (``reference_log_probs``). Step ``sums``:
    ``FIGURES``, the rewards summed over the desirable and the undesirable samples, their counts, the KL estimate
    times the samples, and the samples."""

    FIGURES = ("rewards/chosen", "rewards/rejected", "desirable", "undesirable", "kl", "samples")

    def __init__(self, settings: PreferenceSettings, reference: torch.Tensor | None) -> None:
        if not settings.unpaired:
            raise ValueError(f"KtoObjective scores unpaired samples, not {settings.kind} pairs")
        if reference is None:
            raise ValueError("kto needs the reference log-probabilities of the training samples")
        self.settings, self.reference = settings, reference
        self.kl: torch.Tensor | None = None

    def denominator(self, batches) -> int:
        """The samples of ``batches`` (every rank's micro-batches of the step)."""
        return sum(b.sample_ids.numel() for b in batches)

    @torch.no_grad()
    def begin_step(self, model, batches, device, options=None, world=None, spare=()) -> torch.Tensor:
        """The KL estimate of the step (a float32 device scalar, also kept for its micro-batches): this rank's
        ``batches``' KL sequences scored by the model as it is, against their reference, the sum and the count
        summed over ``world``'s ranks. ``spare``: batches scored and discarded (FSDP needs as many passes on every
        rank)."""
        from kimitune.train.step import to_device

        device = torch.device(device)
        total = torch.zeros(2, device=device)
        for i, batch in enumerate([*batches, *spare]):
            kl = batch.kl
            logps = reply_log_probs(model, to_device(kl.input_ids, device), to_device(kl.labels, device),
                                    kl.cu_seqlens, options, sequences=batch.sample_ids.numel())[0]
            if i < len(batches):
                reference = to_device(self.reference[batch.sample_ids, 1], device)
                total += torch.stack([(logps - reference).sum(), torch.full((), float(logps.numel()), device=device)])
        if world is not None:
            world.all_reduce_sum_(total)
        self.kl = (total[0] / total[1].clamp_min(1)).clamp_min(0)
        return self.kl

    def __call__(self, model, batch, input_ids: torch.Tensor, layout, options, samples: int):
        from kimitune.train.step import MicroBatchLoss, to_device

        if self.kl is None:
            raise RuntimeError("KtoObjective: begin_step must run before the step's micro-batches")
        logps, _, _, _, aux_loss = reply_log_probs(model, input_ids, to_device(batch.labels, input_ids.device),
                                                   layout, options, sequences=batch.sample_ids.numel())
        device = input_ids.device
        desirable = to_device(batch.desirable, device)
        reference = to_device(self.reference[batch.sample_ids, 0], device)
        losses, rewards = kto_terms(self.settings, logps, reference, desirable, self.kl)
        loss = losses.sum() / max(samples, 1)
        count = torch.full((), float(logps.numel()), device=device)
        wanted = desirable.float()
        figures = {"rewards/chosen": (rewards * wanted).sum(), "rewards/rejected": (rewards * (1 - wanted)).sum(),
                   "desirable": wanted.sum(), "undesirable": (1 - wanted).sum(), "kl": self.kl * count,
                   "samples": count}
        return _rank_share(MicroBatchLoss(loss, loss.detach().float(), figures, aux_loss), options)

    @staticmethod
    def means(sums: dict[str, float]) -> dict[str, float]:
        """The mean rewards of the desirable and the undesirable samples (where there were any), their margin, and
        the KL estimate, from a step's (or a window's) summed ``FIGURES``."""
        out = {}
        for name, count in (("rewards/chosen", "desirable"), ("rewards/rejected", "undesirable")):
            if sums.get(count, 0.0) > 0:
                out[name] = sums[name] / sums[count]
        if len(out) == 2:
            out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        if sums.get("samples", 0.0) > 0:
            out["kl"] = sums["kl"] / sums["samples"]
        return out


def objective_for(settings: PreferenceSettings, reference: torch.Tensor | None):
    """The objective of a preference run: ``KtoObjective`` for KTO, else ``PreferenceObjective``."""
    return KtoObjective(settings, reference) if settings.unpaired else PreferenceObjective(settings, reference)


@torch.no_grad()
def evaluate_pairs(model, batches: list, objective, counts, device, options=None, autocast=None, spare: list = (),
                   world=None) -> torch.Tensor:
    """float32 [1 + len(objective.FIGURES)] on ``device``: ``objective``'s loss over ``batches`` (pairs, or KTO's
    samples; divided by ``counts``, the whole eval set's), then its ``FIGURES``' sums; ``figures`` names them. The
    model is put in eval mode. ``spare``: batches run and discarded (FSDP needs as many passes on every rank);
    ``world``: the ranks KTO's KL estimate is summed over (the whole eval set's)."""
    from kimitune.ops import BatchLayout

    model.eval()
    values = torch.zeros(1 + len(objective.FIGURES), device=device)
    with autocast or contextlib.nullcontext():
        if hasattr(objective, "begin_step"):
            objective.begin_step(model, batches, device, options, world, spare)
        for i, batch in enumerate([*batches, *spare]):
            input_ids = batch.input_ids.to(device)
            part = objective(model, batch, input_ids, BatchLayout.of(batch.cu_seqlens, device, input_ids.shape[1]),
                             options, counts)
            if i < len(batches):
                values += torch.stack([part.reported, *(part.sums[name] for name in objective.FIGURES)])
    return values


def figures(values: torch.Tensor, objective, prefix: str = "eval_") -> dict[str, float]:
    """``evaluate_pairs``' values (summed over ranks, if any) as ``{prefix}loss`` and ``{prefix}`` + each of the
    objective's means."""
    loss, *sums = values.tolist()
    means = objective.means(dict(zip(objective.FIGURES, sums)))
    return {f"{prefix}loss": loss} | {f"{prefix}{name}": value for name, value in means.items()}
