"""Continuous-batching scheduler: slots, admission and the choice of the next step.

Pure host bookkeeping; it never touches tensors. Called only from the engine
thread. Policy: when prompts wait and slots are free, the next step is a prefill
packing as many waiting prompts as fit (slots, packed tokens, images, prompts per
step); otherwise it is a decode step over every running sequence. A finished or
aborted sequence gives its slot back at once.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from decoder_service.config import DecoderShapes
from runtime.messages import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: np.ndarray  # [prompt_len] int64
    image_rows: np.ndarray | None  # [placeholders, hidden] float32
    num_images: int
    sampling: SamplingParams
    seed: int  # the request's seed, or one drawn for it
    slot: int = -1
    status: SeqStatus = SeqStatus.WAITING
    output_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass(frozen=True)
class Step:
    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]


class Scheduler:
    def __init__(self, shapes: DecoderShapes, max_prefill_images: int) -> None:
        self.shapes = shapes
        self.max_prefill_images = max_prefill_images
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}
        self._free_slots = list(range(shapes.max_num_seqs - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free_slots)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> Step | None:
        if self.waiting and self._free_slots:
            admitted: list[Sequence] = []
            tokens = images = 0
            while self.waiting and self._free_slots and len(admitted) < self.shapes.max_prefill_seqs:
                seq = self.waiting[0]
                if admitted and (tokens + len(seq.prompt_ids) > self.shapes.max_prefill_tokens
                                 or images + seq.num_images > self.max_prefill_images):
                    break
                self.waiting.popleft()
                seq.slot = self._free_slots.pop()
                seq.status = SeqStatus.RUNNING
                self.running[seq.request_id] = seq
                admitted.append(seq)
                tokens += len(seq.prompt_ids)
                images += seq.num_images
            return Step("prefill", admitted)
        if self.running:
            return Step("decode", list(self.running.values()))
        return None

    def finish(self, seq: Sequence) -> None:
        """Frees the sequence's slot (running) or drops it from the queue (waiting)."""
        if seq.status is SeqStatus.RUNNING:
            del self.running[seq.request_id]
            self._free_slots.append(seq.slot)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.slot = -1
