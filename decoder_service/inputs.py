"""Host-side step inputs: numpy arrays padded to the step's buckets.

Everything a step needs is decided here, on the host, and moved to the device in
one go by the runner. Padded rows are harmless by construction: they write to the
cache's scratch slot, sit in a segment of their own, and their sampled tokens are
never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from decoder_service.config import DecoderShapes
from decoder_service.image_merge import build_image_index
from decoder_service.sampler import SamplingRows
from runtime.buckets import pad_to_bucket

PAD_SEGMENT = -1


@dataclass(frozen=True)
class SeqView:
    """What a step needs to know of one sequence (built by the scheduler)."""

    slot: int
    token_ids: np.ndarray  # prefill: the prompt; decode: the one token to feed
    start_position: int
    image_rows: np.ndarray | None  # [num_placeholders, hidden] for prefill, else None
    temperature: float
    top_p: float
    top_k: int  # 0 = unlimited
    seed: int
    step: int


@dataclass(frozen=True)
class PrefillInputs:
    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64
    segments: np.ndarray  # [T] int64
    row_index: np.ndarray  # [T] int64
    is_image: np.ndarray  # [T] bool
    image_rows: np.ndarray | None  # [images_bucket * tokens_per_image, hidden] float32
    last_index: np.ndarray  # [max_prefill_seqs] int64
    sampling: SamplingRows  # max_prefill_seqs rows
    num_seqs: int

    @property
    def graph(self) -> tuple[int, int]:
        rows = 0 if self.image_rows is None else self.image_rows.shape[0]
        return len(self.token_ids), rows


@dataclass(frozen=True)
class DecodeInputs:
    token_ids: np.ndarray  # [B] int64
    positions: np.ndarray  # [B] int64
    slots: np.ndarray  # [B] int64
    attention_len: int  # static: an attention-length bucket
    sampling: SamplingRows  # B rows
    num_seqs: int


def _sampling_rows(seqs: list[SeqView], rows: int, vocab_size: int) -> SamplingRows:
    pad = SamplingRows.padding(rows, vocab_size)
    for i, s in enumerate(seqs):
        pad.set_row(i, temperature=s.temperature, top_p=s.top_p,
                    top_k=s.top_k if s.top_k > 0 else vocab_size, seed=s.seed, step=s.step)
    return pad


def build_prefill(seqs: list[SeqView], shapes: DecoderShapes, *, image_token_id: int,
                  hidden_size: int, vocab_size: int, scratch_slot: int) -> PrefillInputs:
    if not 0 < len(seqs) <= shapes.max_prefill_seqs:
        raise ValueError(f"a prefill step packs 1..{shapes.max_prefill_seqs} prompts, got {len(seqs)}")
    total = sum(len(s.token_ids) for s in seqs)
    tokens = pad_to_bucket(total, shapes.prefill_token_buckets)
    token_ids = np.zeros(tokens, np.int64)
    positions = np.zeros(tokens, np.int64)
    slots = np.full(tokens, scratch_slot, np.int64)
    segments = np.full(tokens, PAD_SEGMENT, np.int64)
    last_index = np.zeros(shapes.max_prefill_seqs, np.int64)
    offset = 0
    for j, s in enumerate(seqs):
        n = len(s.token_ids)
        token_ids[offset:offset + n] = s.token_ids
        positions[offset:offset + n] = np.arange(s.start_position, s.start_position + n)
        slots[offset:offset + n] = s.slot
        segments[offset:offset + n] = j
        last_index[j] = offset + n - 1
        offset += n

    blocks = [s.image_rows for s in seqs if s.image_rows is not None and len(s.image_rows)]
    counts = [0 if s.image_rows is None else len(s.image_rows) for s in seqs]
    row_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)
    row_index, is_image = build_image_index(token_ids[:total], image_token_id, row_offsets, counts)
    row_index = np.pad(row_index, (0, tokens - total)).astype(np.int64)
    is_image = np.pad(is_image, (0, tokens - total))
    image_rows = None
    if blocks:
        num_images = -(-sum(counts) // shapes.tokens_per_image)
        rows = pad_to_bucket(num_images, shapes.prefill_image_buckets[1:]) * shapes.tokens_per_image
        image_rows = np.zeros((rows, hidden_size), np.float32)
        image_rows[:sum(counts)] = np.concatenate(blocks)
    return PrefillInputs(token_ids, positions, slots, segments, row_index, is_image, image_rows,
                         last_index, _sampling_rows(seqs, shapes.max_prefill_seqs, vocab_size),
                         len(seqs))


def build_decode(seqs: list[SeqView], shapes: DecoderShapes, *, vocab_size: int,
                 scratch_slot: int) -> DecodeInputs:
    batch = pad_to_bucket(len(seqs), shapes.decode_batch_buckets)
    token_ids = np.zeros(batch, np.int64)
    positions = np.zeros(batch, np.int64)
    slots = np.full(batch, scratch_slot, np.int64)
    for i, s in enumerate(seqs):
        token_ids[i] = s.token_ids[0]
        positions[i] = s.start_position
        slots[i] = s.slot
    attention_len = pad_to_bucket(int(positions.max()) + 1, shapes.attention_len_buckets)
    return DecodeInputs(token_ids, positions, slots, attention_len,
                        _sampling_rows(seqs, batch, vocab_size), len(seqs))
