"""One request's state in the decoder: its tokens, its images, its KV blocks.

Host bookkeeping only. The scheduler and the engine (one thread) mutate it.
`num_computed` counts the tokens whose keys and values are in the KV pool; a
sequence is prefilling until every known token but the last sampled one is
computed, and decoding after that.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.messages import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class ImageSpan:
    """A run of image placeholder positions and the embedding rows that fill it."""

    start: int  # position of the first placeholder in the prompt
    length: int  # placeholders = embedding rows
    key: str  # the image's cache key (the encoder's): part of the KV block hashes
    row_offset: int  # where its rows start in `Sequence.image_rows`
    image_offset: int = 0  # rows of the same image before this span (placeholders split by text)


def image_spans(prompt_ids: np.ndarray, image_token_id: int, rows_per_image: list[int],
                keys: list[str]) -> tuple[ImageSpan, ...]:
    """Placeholders are filled in order: image i takes the next `rows_per_image[i]` of them.
    Each image becomes one span per contiguous run of its placeholders."""
    positions = np.flatnonzero(np.asarray(prompt_ids) == image_token_id)
    if len(positions) != sum(rows_per_image):
        raise ValueError(f"{len(positions)} placeholders for {sum(rows_per_image)} image rows")
    spans, cursor = [], 0
    for rows, key in zip(rows_per_image, keys):
        mine = positions[cursor:cursor + rows]
        breaks = np.flatnonzero(np.diff(mine) != 1) + 1
        for run_start, run_end in zip([0, *breaks], [*breaks, rows]):
            if run_end > run_start:
                spans.append(ImageSpan(start=int(mine[run_start]), length=int(run_end - run_start),
                                       key=key, row_offset=cursor + int(run_start),
                                       image_offset=int(run_start)))
        cursor += rows
    return tuple(spans)


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    seed: int  # the request's seed, or one drawn for it
    images: tuple[ImageSpan, ...] = ()
    image_rows: np.ndarray | None = None  # [placeholders, hidden] float32, all images in order
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)  # KV blocks, in position order
    block_hashes: list[bytes] = field(default_factory=list)  # of its full blocks, a chain
    num_computed: int = 0  # tokens whose KV is in the pool
    prefilled: bool = False  # every known token was computed once: the sequence decodes
    num_preemptions: int = 0  # times its blocks were taken back: each re-admission recomputes
    grammar: Any = None  # grammar.GrammarState under response_format, else None
    stop_ids: tuple[int, ...] = ()  # EOS and stop_token_ids: banned until min_tokens are out

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_ids(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of prompt + output, int64."""
        prompt = len(self.prompt_ids)
        if end <= prompt:
            return np.asarray(self.prompt_ids[start:end], np.int64)
        if start >= prompt:
            return np.asarray(self.output_ids[start - prompt:end - prompt], np.int64)
        return np.asarray([*self.prompt_ids[start:], *self.output_ids[:end - prompt]], np.int64)

    def image_row_index(self, start: int, end: int) -> np.ndarray:
        """For positions [start, end): the row of `image_rows` that fills each, -1 for text."""
        index = np.full(end - start, -1, np.int64)
        for span in self.images:
            lo, hi = max(span.start, start), min(span.start + span.length, end)
            if lo < hi:
                index[lo - start:hi - start] = np.arange(lo - span.start, hi - span.start) + span.row_offset
        return index
