"""The generation cache: N sequences of different lengths, prefilled together, then decoded one token at a time.

Per layer it holds what the model's own ``KimiLinearCache`` holds (``kimitune.model``), one row per sequence:

    KDA layer   conv [N, 3*H*K, W] (the last W q/k/v inputs) and recurrent [N, H, K, V] float32: constant in length
    MLA layer   latent [N, S, kv_lora_rank] (after kv_a_layernorm) and k_shared [N, S, qk_rope_head_dim], plus
                valid [N, S] bool where rows hold different numbers of tokens: the compressed latent per token,
                never the per-head keys and values: a decode step attends in the latent space, a prefill or a
                multi-token step re-expands the latents through kv_b_proj (kimitune.model.mla)

Prefill packs the prompts into one row with ``cu_seqlens``, so every sequence gets its own final KDA and conv state
and no token ever sees another sequence (left padding would not be exact: pad tokens would enter the KDA state).
Prompts go in groups of at most ``prefill_tokens`` tokens (the packed attention mask is [total, total]); one
prompt alone runs unpacked, in pieces of ``prefill_tokens`` tokens when it is longer (each piece continues the
cache the one before left), so the activations of a long prompt never exceed one piece's. The MLA latents of each
group come out as one packed row and are split here into right-padded rows with a ``valid`` mask; decoding appends
one column per step, valid for every row, and the MLA layer masks the padding (it has no position encoding, so the
gaps change nothing). Finished sequences are dropped
from the batch (``keep``) and so are padding columns no remaining row needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from kimitune.model import KimiLinearCache, KimiLinearForCausalLM
from kimitune.model.kda import KDAState
from kimitune.model.mla import MLAState

DEFAULT_PREFILL_TOKENS = 8192


@dataclass(frozen=True)
class CacheMemory:
    """Bytes held by a cache: the KDA layers' states (flat in the context length) and the MLA layers' latents."""

    kda_bytes: int
    mla_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.kda_bytes + self.mla_bytes


def _unpack_mla(state: MLAState, lengths: Sequence[int]) -> MLAState:
    """A packed prefill's latents [1, total, .] -> right-padded rows [N, max(lengths), .] and their valid mask."""
    longest = max(lengths)

    def rows(packed: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.pad(part, (0, 0, 0, longest - len(part)))
                            for part in packed[0].split(list(lengths))])

    valid = torch.arange(longest, device=state.latent.device)[None, :] < torch.tensor(
        lengths, device=state.latent.device)[:, None]
    return MLAState(rows(state.latent), rows(state.k_shared), valid)


def _concat_states(states: Sequence[KDAState | MLAState]) -> KDAState | MLAState:
    """The states of several groups of sequences as one batch (MLA rows padded to the longest)."""
    if isinstance(states[0], KDAState):
        return KDAState(torch.cat([s.conv for s in states]), torch.cat([s.recurrent for s in states]))
    longest = max(s.latent.shape[1] for s in states)

    def pad(t: torch.Tensor, value=0) -> torch.Tensor:  # [n, S, .] or [n, S] -> S = longest
        widths = (0, 0, 0, longest - t.shape[1]) if t.dim() == 3 else (0, longest - t.shape[1])
        return F.pad(t, widths, value=value)

    valids = [s.valid if s.valid is not None else torch.ones(s.latent.shape[:2], dtype=torch.bool,
                                                            device=s.latent.device) for s in states]
    return MLAState(torch.cat([pad(s.latent) for s in states]), torch.cat([pad(s.k_shared) for s in states]),
                    torch.cat([pad(v, False) for v in valids]))


class GenerationCache:
    """The states of N sequences between forward calls, and the calls that extend them.

    ``sequences[i]``: the token ids sequence ``i`` has fed into the cache so far (its exact history: a chat turn
    checks that the template's rendering of the conversation extends it before reusing the cache).
    Every method returns next-token logits [N, V] (float32) for the sequences it extended, and only those.
    The model runs as it is (put it in eval mode); only the last position of each call goes through lm_head.
    """

    def __init__(self, model: KimiLinearForCausalLM, prefill_tokens: int = DEFAULT_PREFILL_TOKENS) -> None:
        self.model = model
        self.prefill_tokens = prefill_tokens
        self.sequences: list[list[int]] = []
        self._cache = KimiLinearCache()

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device

    def __len__(self) -> int:
        return len(self.sequences)

    @property
    def layer_states(self) -> dict[int, KDAState | MLAState]:
        """The state of each layer (by index), one row per sequence, as the model's ``KimiLinearCache`` holds it."""
        return self._cache.states

    def reset(self) -> None:
        self.sequences = []
        self._cache = KimiLinearCache()

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden).float()

    def _feed(self, ids: torch.Tensor, cache: KimiLinearCache) -> torch.Tensor:
        """One sequence's tokens ids [1, T] into ``cache``, in pieces of ``prefill_tokens`` (each continuing the cache
        the one before left) -> the last piece's hidden states [1, t, C]."""
        for start in range(0, ids.shape[1], self.prefill_tokens):
            hidden, _ = self.model.model(ids[:, start : start + self.prefill_tokens], None, cache)
        return hidden

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Starts N sequences from their prompts (each non-empty) -> logits [N, V] after each prompt's last token."""
        if self.sequences:
            raise ValueError("prefill starts new sequences: reset() the cache first")
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("prefill needs at least one prompt, and every prompt at least one token")
        groups: list[list[int]] = [[]]
        size = 0
        for i, prompt in enumerate(prompts):
            if groups[-1] and size + len(prompt) > self.prefill_tokens:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += len(prompt)
        caches, logits = [], []
        for group in groups:
            cache, group_logits = self._prefill_group([prompts[i] for i in group])
            caches.append(cache)
            logits.append(group_logits)
        self._cache = KimiLinearCache({i: _concat_states([c.states[i] for c in caches]) if len(caches) > 1
                                       else caches[0].states[i] for i in caches[0].states})
        self.sequences = [list(p) for p in prompts]
        return torch.cat(logits)

    def _prefill_group(self, prompts: Sequence[Sequence[int]]) -> tuple[KimiLinearCache, torch.Tensor]:
        cache = KimiLinearCache()
        lengths = [len(p) for p in prompts]
        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=self.device)[None]
        if len(prompts) == 1:
            return cache, self._logits(self._feed(ids, cache)[:, -1])
        cu_seqlens = torch.tensor([0, *accumulate(lengths)], dtype=torch.int32)  # stays on the host
        hidden, _ = self.model.model(ids, cu_seqlens, cache)
        for i, state in cache.states.items():
            if isinstance(state, MLAState):
                cache.states[i] = _unpack_mla(state, lengths)
        last = (cu_seqlens[1:] - 1).to(device=self.device, dtype=torch.long)
        return cache, self._logits(hidden[0, last])

    @torch.no_grad()
    def extend(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feeds several tokens to the one sequence of the cache (a chat's next turn) -> logits [1, V]."""
        if len(self.sequences) != 1:
            raise ValueError(f"extend continues a single sequence; the cache holds {len(self.sequences)}")
        if not tokens:
            raise ValueError("extend needs at least one token")
        ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        hidden = self._feed(ids, self._cache)
        self.sequences[0].extend(tokens)
        return self._logits(hidden[:, -1])

    @torch.no_grad()
    def step(self, tokens: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """One decode step: one token per sequence ([N]) -> logits [N, V]."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device)
        if tokens.shape != (len(self.sequences),):
            raise ValueError(f"step takes one token per sequence ({len(self.sequences)}), got {tuple(tokens.shape)}")
        hidden, _ = self.model.model(tokens[:, None], None, self._cache)
        for sequence, token in zip(self.sequences, tokens.tolist()):
            sequence.append(token)
        return self._logits(hidden[:, -1])

    def keep(self, rows: Sequence[int]) -> None:
        """Keeps only sequences ``rows`` (in that order); drops MLA padding columns that no kept row uses."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.device)
        for i, state in self._cache.states.items():
            if isinstance(state, KDAState):
                self._cache.states[i] = KDAState(state.conv[index], state.recurrent[index])
                continue
            latent, k_shared, valid = state.latent[index], state.k_shared[index], state.valid
            if valid is not None:
                valid = valid[index]
                used = valid.any(0)
                if not bool(used.all()):
                    latent, k_shared, valid = latent[:, used], k_shared[:, used], valid[:, used]
            self._cache.states[i] = MLAState(latent, k_shared, valid)
        self.sequences = [self.sequences[r] for r in rows]

    def memory(self) -> CacheMemory:
        """The bytes of the states held now (the MLA ``valid`` mask, one byte per slot, is counted with MLA)."""
        kda = mla = 0
        for state in self._cache.states.values():
            if isinstance(state, KDAState):
                kda += _nbytes(state.conv) + _nbytes(state.recurrent)
            else:
                mla += _nbytes(state.latent) + _nbytes(state.k_shared) + _nbytes(state.valid)
        return CacheMemory(kda, mla)


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
