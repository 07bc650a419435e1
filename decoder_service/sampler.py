"""Sampling on the device, with fixed shapes and per-row parameters as tensors.

Every row carries its own temperature, top_p, top_k, seed and step, so changing
sampling parameters never changes the graph. Before sampling, `adjust_logits` applies
per-row biases, penalties and the grammar's token bitmask, again from fixed-shape
inputs that rows without them fill with neutral padding, so they add no graph. Randomness is counter-based: the
Gumbel noise for (seed, step, token) is a hash of those three integers, so a
seeded request draws the same tokens whatever its batch neighbours, bucket or
replica, and nothing depends on a device RNG's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.messages import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS

MAX_CANDIDATES = 64  # rows with top_k/top_p sample among their 64 most likely tokens
assert MAX_CANDIDATES >= MAX_TOP_LOGPROBS  # the top logprobs are the first candidates
# Additive bias entries per row: the request's logit_bias, then -inf on EOS and its stop
# token ids while min_tokens is not reached.
BIAS_SLOTS = MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS + 1
ALL_ALLOWED = -1  # a bitmask word with every bit set: 32 tokens allowed


def bitmask_words(vocab_size: int) -> int:
    """int32 words of a token bitmask row (xgrammar's layout: token t is bit t % 32 of word t // 32)."""
    return -(-vocab_size // 32)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int32, wrapping like C unsigned
    arithmetic; masks turn arithmetic right shifts into logical ones. int32 only: int64 is
    slow on XLA:CPU and emulated on TPU."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x7FEB352D
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * -0x7B935975  # 0x846CA68B as a signed 32-bit int
    return x ^ ((x >> 16) & 0xFFFF)


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor,
                  token_ids: torch.Tensor) -> torch.Tensor:
    """u in (0, 1): [N, V], a pure function of (seed, step, token id). All int32.
    token_ids: [V] int32, 0..V-1 (made once: `torch.arange` on XLA costs milliseconds a call)."""
    token = token_ids[None, :]
    row = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32(step)))
    x = _mix32(row[:, None] ^ (token * -0x61C88647))  # golden-ratio stride, as signed int32
    return (((x >> 8) & 0xFFFFFF).float() + 0.5) * (1.0 / (1 << 24))


def split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as two signed int32 halves (low, high)."""
    lo, hi = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


@dataclass(frozen=True)
class SamplingRows:
    """Host side: per-row parameters, padded to the step's row count. Padding is neutral:
    bias and history entries point at the sink column `vocab_size` (dropped on the device),
    the bitmask allows everything."""

    temperature: np.ndarray  # [N] float32; 0 = greedy
    top_p: np.ndarray  # [N] float32
    top_k: np.ndarray  # [N] int32; vocab size when unlimited
    seed_lo: np.ndarray  # [N] int32: the seed's low 32 bits
    seed_hi: np.ndarray  # [N] int32: its high bits
    step: np.ndarray  # [N] int32: tokens this request has sampled so far
    presence: np.ndarray  # [N] float32: presence_penalty
    frequency: np.ndarray  # [N] float32: frequency_penalty
    repetition: np.ndarray  # [N] float32: repetition_penalty (1 = none)
    bias_ids: np.ndarray  # [N, BIAS_SLOTS] int32, vocab_size where unused
    bias_values: np.ndarray  # [N, BIAS_SLOTS] float32, added to those tokens' logits
    history_ids: np.ndarray  # [N, max_model_len] int32: prompt then output ids (penalty rows only)
    prompt_lens: np.ndarray  # [N] int32: history entries before this are the prompt
    bitmask: np.ndarray  # [N, ceil(V/32)] int32: allowed tokens (grammar rows), else ALL_ALLOWED

    @classmethod
    def padding(cls, rows: int, vocab_size: int, history_len: int) -> "SamplingRows":
        def zeros(dtype=np.float32):
            return np.zeros(rows, dtype)
        return cls(zeros(), np.ones(rows, np.float32), np.full(rows, vocab_size, np.int32),
                   zeros(np.int32), zeros(np.int32), zeros(np.int32), zeros(), zeros(),
                   np.ones(rows, np.float32), np.full((rows, BIAS_SLOTS), vocab_size, np.int32),
                   np.zeros((rows, BIAS_SLOTS), np.float32),
                   np.full((rows, history_len), vocab_size, np.int32), zeros(np.int32),
                   np.full((rows, bitmask_words(vocab_size)), ALL_ALLOWED, np.int32))

    def set_row(self, i: int, *, temperature: float, top_p: float, top_k: int, seed: int,
                step: int) -> None:
        self.temperature[i], self.top_p[i], self.top_k[i], self.step[i] = temperature, top_p, top_k, step
        self.seed_lo[i], self.seed_hi[i] = split_seed(seed)

    def set_penalties(self, i: int, *, presence: float, frequency: float, repetition: float,
                      prompt_ids: list[int], output_ids: list[int]) -> None:
        self.presence[i], self.frequency[i], self.repetition[i] = presence, frequency, repetition
        n = len(prompt_ids) + len(output_ids)
        self.history_ids[i, :n] = prompt_ids + output_ids
        self.prompt_lens[i] = len(prompt_ids)

    def set_bias(self, i: int, entries: list[tuple[int, float]]) -> None:
        ids, values = zip(*entries) if entries else ((), ())
        self.bias_ids[i, :len(ids)] = ids
        self.bias_values[i, :len(values)] = values

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)).to(device)
                for name in self.__dataclass_fields__}


def index_tensors(vocab_size: int, device: torch.device, history_len: int = 1) -> dict[str, torch.Tensor]:
    """The constant index vectors `sample` needs, made once per device."""
    token_ids = torch.arange(vocab_size, dtype=torch.int32)
    return {"token_ids": token_ids.to(device),
            "ranks": torch.arange(min(MAX_CANDIDATES, vocab_size), dtype=torch.int32).to(device),
            "word_index": (token_ids // 32).long().to(device),
            # 1 << (t % 32) as int32 (bit 31 is the sign bit): tested with `&`, never a shift,
            # since XLA shifts negative words arithmetically differently from eager torch.
            "bit_values": torch.from_numpy(
                (np.uint32(1) << (np.arange(vocab_size) % 32).astype(np.uint32)).view(np.int32)).to(device),
            "history_positions": torch.arange(history_len, dtype=torch.int32).to(device)}


def _per_token(ids: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """Sums `values` [N, K] into [N, vocab] at `ids` [N, K]; id `vocab` is the dropped sink."""
    out = torch.zeros(ids.shape[0], vocab + 1, dtype=values.dtype, device=ids.device)
    return out.scatter_add(1, ids.long(), values)[:, :vocab]


def adjust_logits(logits: torch.Tensor, presence, frequency, repetition, bias_ids, bias_values,
                  history_ids, prompt_lens, bitmask, *, word_index: torch.Tensor,
                  bit_values: torch.Tensor, history_positions: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] float32 -> [N, V]. vLLM's order and formulas: additive bias (logit_bias,
    min_tokens' bans); repetition penalty on every token of prompt or output (positive logits
    divided, negative multiplied); minus frequency x output count, minus presence x (count > 0);
    then the grammar's bitmask, -inf where a token's bit is 0 (the word picked per token by
    `index_select`, its bit tested with `&`)."""
    vocab = logits.shape[-1]
    logits = logits + _per_token(bias_ids, bias_values, vocab)
    is_output = (history_positions[None, :] >= prompt_lens[:, None]).float()  # [N, L]
    output_counts = _per_token(history_ids, is_output, vocab)
    seen = _per_token(history_ids, torch.ones_like(is_output), vocab) > 0
    rep = repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0).float()
    allowed = (bitmask.index_select(1, word_index) & bit_values[None, :]) != 0  # [N, V]
    return torch.where(allowed, logits, torch.full_like(logits, float("-inf")))


def sample(logits: torch.Tensor, temperature, top_p, top_k, seed_lo, seed_hi, step, presence,
           frequency, repetition, bias_ids, bias_values, history_ids, prompt_lens, bitmask, *,
           token_ids: torch.Tensor, ranks: torch.Tensor, word_index: torch.Tensor,
           bit_values: torch.Tensor, history_positions: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] float32, adjusted first (`adjust_logits`). Returns [N, 2 + 2*MAX_TOP_LOGPROBS] float32, one row per
    sequence: sampled token id, its logprob, top token ids, top logprobs (ids are exact in
    float32 for vocabularies under 2**24). One output tensor: one transfer to the host.

    Rows without top_k/top_p draw by Gumbel-max over the whole vocabulary; rows with
    them draw among their `MAX_CANDIDATES` best tokens (top_k is capped there), with
    the same per-token noise, so no full-vocabulary sort is ever needed."""
    vocab = logits.shape[-1]
    logits = adjust_logits(logits, presence, frequency, repetition, bias_ids, bias_values,
                           history_ids, prompt_lens, bitmask, word_index=word_index,
                           bit_values=bit_values, history_positions=history_positions)
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = torch.argmax(logits, dim=-1)

    scaled = logits / torch.clamp(temperature, min=1e-5)[:, None]
    gumbel = -torch.log(-torch.log(uniform_noise(seed_lo, seed_hi, step, token_ids)))
    unrestricted = torch.argmax(scaled + gumbel, dim=-1)

    cand_logits, cand_ids = torch.topk(scaled, ranks.shape[0], dim=-1)  # [N, C], best first
    cand_probs = torch.exp(cand_logits - torch.logsumexp(scaled, dim=-1, keepdim=True))
    mass_before = torch.cumsum(cand_probs, dim=-1) - cand_probs
    keep = (ranks[None, :] < top_k[:, None]) & (mass_before < top_p[:, None])  # rank 0 always kept
    cand_scores = torch.where(keep, cand_logits + gumbel.gather(1, cand_ids),
                              torch.full_like(cand_logits, float("-inf")))
    limited = cand_ids.gather(1, torch.argmax(cand_scores, dim=-1, keepdim=True))[:, 0]

    restricted = (top_k < vocab) | (top_p < 1.0)
    tokens = torch.where(temperature == 0, greedy, torch.where(restricted, limited, unrestricted))
    token_logprob = logprobs.gather(1, tokens[:, None])
    # The top logprobs are the best candidates': `scaled` and `logprobs` order a row's tokens
    # alike (both are its logits, scaled by a positive factor or shifted), so one top-k serves
    # both (a top-k over the vocabulary is ~5 ms at 16 rows on XLA:CPU).
    top_ids = cand_ids[:, :MAX_TOP_LOGPROBS]
    top_logprobs = logprobs.gather(1, top_ids)
    return torch.cat([tokens[:, None].float(), token_logprob, top_ids.float(), top_logprobs], dim=-1)


@dataclass(frozen=True)
class SampledRow:
    token_id: int
    logprob: float
    top_ids: np.ndarray
    top_logprobs: np.ndarray


def unpack(output: np.ndarray, rows: int) -> list[SampledRow]:
    """Host side: the first `rows` rows of `sample`'s output."""
    k = MAX_TOP_LOGPROBS
    return [SampledRow(int(r[0]), float(r[1]), r[2:2 + k].astype(np.int64), r[2 + k:2 + 2 * k])
            for r in output[:rows]]
