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

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    # A 32-bit integer finaliser (xorshift-multiply), on int64 so products never overflow.
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """u in (0, 1): [N, vocab], a pure function of (seed, step, token id)."""
    token = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)[None, :]
    row = _mix32((seeds & _MASK32) ^ _mix32((seeds >> 32) ^ _mix32(steps & _MASK32)))
    x = _mix32(row[:, None] ^ ((token * 0x9E3779B1) & _MASK32))
    return ((x >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass(frozen=True)
class SamplingRows:
    """Host side: per-row parameters, padded to the step's row count."""

    temperature: np.ndarray  # [N] float32; 0 = greedy
    top_p: np.ndarray  # [N] float32
    top_k: np.ndarray  # [N] int64; vocab size when unlimited
    seed: np.ndarray  # [N] int64
    step: np.ndarray  # [N] int64: tokens this request has sampled so far

    @classmethod
    def padding(cls, rows: int, vocab_size: int) -> "SamplingRows":
        return cls(np.zeros(rows, np.float32), np.ones(rows, np.float32),
                   np.full(rows, vocab_size, np.int64), np.zeros(rows, np.int64),
                   np.zeros(rows, np.int64))

    def to(self, device: torch.device) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(getattr(self, name)).to(device)
                for name in ("temperature", "top_p", "top_k", "seed", "step")}


def sample(logits: torch.Tensor, temperature, top_p, top_k, seed, step) -> torch.Tensor:
    """logits: [N, V] float32. Returns [N, 2 + 2*MAX_TOP_LOGPROBS] float32, one row per
    sequence: sampled token id, its logprob, top token ids, top logprobs (ids are exact in
    float32 for vocabularies under 2**24). One output tensor: one transfer to the host."""
    vocab = logits.shape[-1]
    logprobs = torch.log_softmax(logits, dim=-1)
    greedy = torch.argmax(logits, dim=-1)

    scaled = logits / torch.clamp(temperature, min=1e-5)[:, None]
    sorted_logits, _ = torch.sort(scaled, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs
    rank = torch.arange(vocab, device=logits.device)[None, :]
    keep = (rank < top_k[:, None]) & (mass_before < top_p[:, None])  # rank 0 always kept
    cutoff = torch.where(keep, sorted_logits, torch.full_like(sorted_logits, float("inf")))
    cutoff = cutoff.min(dim=-1, keepdim=True).values
    filtered = torch.where(scaled >= cutoff, scaled, torch.full_like(scaled, float("-inf")))
    gumbel = -torch.log(-torch.log(uniform_noise(seed, step, vocab)))
    sampled = torch.argmax(filtered + gumbel, dim=-1)

    tokens = torch.where(temperature == 0, greedy, sampled)
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
