"""Sampling on the device, with fixed shapes and per-row parameters as tensors.

Every row carries its own temperature, top_p, top_k, seed and step, so changing
sampling parameters never changes the graph. Randomness is counter-based: the
Gumbel noise for (seed, step, token) is a hash of those three integers, so a
seeded request draws the same tokens whatever its batch neighbours, bucket or
replica, and nothing depends on a device RNG's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.messages import MAX_TOP_LOGPROBS

MAX_CANDIDATES = 64  # rows with top_k/top_p sample among their 64 most likely tokens


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
    """Host side: per-row parameters, padded to the step's row count."""

    temperature: np.ndarray  # [N] float32; 0 = greedy
    top_p: np.ndarray  # [N] float32
    top_k: np.ndarray  # [N] int32; vocab size when unlimited
    seed_lo: np.ndarray  # [N] int32: the seed's low 32 bits
    seed_hi: np.ndarray  # [N] int32: its high bits
    step: np.ndarray  # [N] int32: tokens this request has sampled so far

    @classmethod
    def padding(cls, rows: int, vocab_size: int) -> "SamplingRows":
        return cls(np.zeros(rows, np.float32), np.ones(rows, np.float32),
                   np.full(rows, vocab_size, np.int32), np.zeros(rows, np.int32),
                   np.zeros(rows, np.int32), np.zeros(rows, np.int32))

    def set_row(self, i: int, *, temperature: float, top_p: float, top_k: int, seed: int,
                step: int) -> None:
        self.temperature[i], self.top_p[i], self.top_k[i], self.step[i] = temperature, top_p, top_k, step
        self.seed_lo[i], self.seed_hi[i] = split_seed(seed)

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)).to(device)
                for name in ("temperature", "top_p", "top_k", "seed_lo", "seed_hi", "step")}


def index_tensors(vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The constant index vectors `sample` needs, made once per device."""
    return {"token_ids": torch.arange(vocab_size, dtype=torch.int32).to(device),
            "ranks": torch.arange(min(MAX_CANDIDATES, vocab_size), dtype=torch.int32).to(device)}


def sample(logits: torch.Tensor, temperature, top_p, top_k, seed_lo, seed_hi, step, *,
           token_ids: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """logits: [N, V] float32. Returns [N, 2 + 2*MAX_TOP_LOGPROBS] float32, one row per
    sequence: sampled token id, its logprob, top token ids, top logprobs (ids are exact in
    float32 for vocabularies under 2**24). One output tensor: one transfer to the host.

    Rows without top_k/top_p draw by Gumbel-max over the whole vocabulary; rows with
    them draw among their `MAX_CANDIDATES` best tokens (top_k is capped there), with
    the same per-token noise, so no full-vocabulary sort is ever needed."""
    vocab = logits.shape[-1]
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
    top_logprobs, top_ids = torch.topk(logprobs, MAX_TOP_LOGPROBS, dim=-1)
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
