"""Continuous batching with chunked prefill: which tokens the next engine step computes.

Pure host policy; it never touches tensors. Called only from the engine thread.

Each step holds every decoding sequence (one token each) plus prefill chunks up to
the token budget (`max_num_batched_tokens` less the decode tokens, and at most
`chunk_tokens_while_decoding` when anything decodes), so a long prompt spreads over
steps and running sequences never wait longer than one capped chunk; a step with
nothing decoding spends the whole budget on prompts.

While the cores are shared (`contended`: the engine's graph calls run slower than their
best, or other processes' threads wait for every core, as the encoder's do beside the
decoder on a CPU host; graph_times.py), the cap halves: a contended step takes about
twice as long, and would stall the running streams twice as long as the cap was chosen
for. An encoder on the same host that has announced a batch (`encoder_busy`,
runtime/chunk_step_gate.py) halves it too, once at least half of `max_num_seqs` decode
(counted as they are; whether a step runs on the mixed graph counts its batch bucket
instead, runner.mixed_graph_for): the step is then marked `beside_encoder` and does not
make the encoder wait. With fewer streams running, the prompts filling the batch go first:
the step keeps its whole chunk and the encoder waits for it.

Chunks go first to prompts already started, in admission order, then to waiting
requests (first come, first served), each of which first takes its longest cached
prefix. A waiting prompt whose next blocks a running prompt is still computing (the
same image sent twice at once) is passed over until they are computed and cached, so
the image is prefilled once; those behind it are admitted meanwhile. A prompt is
admitted only when the pool can hold all of its blocks. When a decoding sequence needs
a block and the pool is empty, the newest running sequence is preempted: its blocks are
released (they stay cached) and it waits at the head of the queue to be computed again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from decoder_service.block_manager import BlockManager, extend_block_hashes
from decoder_service.config import DecoderShapes
from decoder_service.sequence import Sequence, SeqStatus


@dataclass(frozen=True)
class Chunk:
    """Prefill of positions [start, end) of one sequence."""

    seq: Sequence
    start: int
    end: int
    # Computes the sequence's last known token, so its logits give the next one. Fixed when the
    # chunk is made: the step's own token, once appended, must not change the answer.
    completes: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "completes", self.end == self.seq.num_tokens)

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ScheduledStep:
    decodes: list[Sequence]
    chunks: list[Chunk]
    beside_encoder: bool = False  # sized for an encoder batch computing beside it


class Scheduler:
    def __init__(self, shapes: DecoderShapes, blocks: BlockManager,
                 chunk_tokens_while_decoding: int) -> None:
        self.shapes = shapes  # its max_chunk_tokens is the step's budget, max_num_batched_tokens
        self.blocks = blocks
        self.chunk_tokens_while_decoding = chunk_tokens_while_decoding
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is preempted first
        # Hashes of prompt blocks that running prompts have yet to compute, and whose they are.
        self._computing: dict[bytes, Sequence] = {}
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, contended: bool = False, encoder_busy: bool = False) -> ScheduledStep | None:
        """The next step; `contended`: the cores are shared; `encoder_busy`: an encoder on
        this host computes a batch or is about to (the module docstring)."""
        decodes = self._schedule_decodes()
        beside_encoder = encoder_busy and 2 * len(decodes) >= self.shapes.max_num_seqs
        budget = self._chunk_budget(len(decodes), halved=contended or beside_encoder)
        chunks = self._continue_prompts(budget)
        chunks += self._admit_waiting(chunks, budget - sum(c.num_tokens for c in chunks))
        if not decodes and not chunks:
            return None
        return ScheduledStep(decodes, chunks, beside_encoder)

    def finish(self, seq: Sequence) -> None:
        """Releases a finished or aborted sequence's blocks, wherever it is."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def advance(self, seq: Sequence, num_computed: int) -> None:
        """After a step: `seq`'s tokens up to `num_computed` are in the pool. Its newly full
        blocks join the prefix cache."""
        bs = self.shapes.block_size
        first, last = seq.num_computed // bs, num_computed // bs
        seq.num_computed = num_computed
        if last > first and self.blocks.enable_prefix_caching:
            hashes = extend_block_hashes(seq, bs, last)
            self.blocks.register(seq.block_table[first:last], hashes[first:last])
            self._stop_computing(seq, hashes[first:last])

    # --- policy pieces -----------------------------------------------------------------
    def _chunk_budget(self, decodes: int, halved: bool) -> int:
        """Prefill tokens the step may carry beside `decodes` decode tokens: the rest of the
        budget, capped while anything decodes (the cap halved while `halved`)."""
        budget = self.shapes.max_chunk_tokens - decodes
        if decodes:
            cap = self.chunk_tokens_while_decoding
            budget = min(budget, max(1, cap // 2) if halved else cap)
        return budget

    def _continue_prompts(self, budget: int) -> list[Chunk]:
        """Next chunks of the prompts already running, in admission order, within `budget`
        tokens, `max_prefill_seqs` chunks and one sequence's worth of context blocks."""
        chunks: list[Chunk] = []
        context_blocks = 0
        for seq in self.running:
            if seq.prefilled or budget <= 0 or len(chunks) == self.shapes.max_prefill_seqs:
                continue
            chunk = self._chunk(seq, budget)
            if context_blocks + self._context_blocks(chunk) > self.shapes.max_blocks_per_seq:
                break
            chunks.append(chunk)
            context_blocks += self._context_blocks(chunk)
            budget -= chunk.num_tokens
        return chunks

    def _admit_waiting(self, chunks: list[Chunk], budget: int) -> list[Chunk]:
        """First chunks of waiting requests admitted beside `chunks`, first come first served,
        within what `chunks` left of the budget, the chunk count and the context blocks."""
        admitted: list[Chunk] = []
        context_blocks = sum(self._context_blocks(c) for c in chunks)
        passed_over: list[Sequence] = []
        while (self.waiting and budget > 0
               and len(chunks) + len(admitted) < self.shapes.max_prefill_seqs
               and len(self.running) < self.shapes.max_num_seqs):
            seq = self.waiting[0]
            hashes = self._reusable_hashes(seq)
            cached = self.blocks.match_prefix(hashes)
            if len(cached) < len(hashes) and hashes[len(cached)] in self._computing:
                # Its next block is being computed by a running prompt: wait, then take it.
                passed_over.append(self.waiting.popleft())
                continue
            chunk = self._admit(seq, hashes, cached, budget,
                                self.shapes.max_blocks_per_seq - context_blocks)
            if chunk is None:
                break  # the head waits (for blocks, or for a step with room); the rest behind it
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            admitted.append(chunk)
            context_blocks += self._context_blocks(chunk)
            budget -= chunk.num_tokens
        self.waiting.extendleft(reversed(passed_over))  # they keep their places
        return admitted

    def _schedule_decodes(self) -> list[Sequence]:
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if not seq.prefilled or seq.status is not SeqStatus.RUNNING:
                continue
            position = seq.num_tokens - 1  # the last sampled token is fed and computed
            while len(seq.block_table) * self.shapes.block_size <= position:
                if self.blocks.num_free:
                    seq.block_table += self.blocks.allocate(1)
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is SeqStatus.RUNNING:
                decodes.append(seq)
        return [s for s in decodes if s.status is SeqStatus.RUNNING]

    def _reusable_hashes(self, seq: Sequence) -> list[bytes]:
        """Hashes of `seq`'s full blocks before its last token, which is always computed (its
        logits give the next token); none without prefix caching."""
        if not self.blocks.enable_prefix_caching:
            return []
        bs = self.shapes.block_size
        return extend_block_hashes(seq, bs, (seq.num_tokens - 1) // bs)

    def _admit(self, seq: Sequence, hashes: list[bytes], cached: list[int], budget: int,
               context_room: int) -> Chunk | None:
        """Gives `seq` its cached prefix (`cached`, the blocks matching the start of its
        reusable `hashes`) and blocks for every known token, and its first chunk, if the pool
        has the blocks and the step has room for the chunk's context."""
        bs = self.shapes.block_size
        start = len(cached) * bs
        end = min(seq.num_tokens, start + budget)
        new_blocks = self.shapes.blocks_for(seq.num_tokens) - len(cached)
        if (self.shapes.blocks_for(end) > context_room
                or self.blocks.blocks_to_admit(cached, new_blocks) > self.blocks.num_free):
            return None
        self.blocks.acquire(cached)
        if not seq.num_preemptions:
            self.blocks.count_lookup(seq.num_tokens, len(cached))
        seq.block_table = cached + self.blocks.allocate(new_blocks)
        seq.num_computed = start
        for h in hashes[len(cached):]:  # none without prefix caching (`_reusable_hashes`)
            self._computing.setdefault(h, seq)
        return Chunk(seq, start, end)

    def _chunk(self, seq: Sequence, budget: int) -> Chunk:
        return Chunk(seq, seq.num_computed, min(seq.num_tokens, seq.num_computed + budget))

    def _context_blocks(self, chunk: Chunk) -> int:
        return self.shapes.blocks_for(chunk.end)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        seq.num_preemptions += 1
        self.preemptions += 1

    def _stop_computing(self, seq: Sequence, hashes: list[bytes]) -> None:
        for h in hashes:
            if self._computing.get(h) is seq:
                del self._computing[h]

    def _release(self, seq: Sequence) -> None:
        self._stop_computing(seq, seq.block_hashes)
        self.blocks.release(seq.block_table)
        seq.block_table = []
        seq.num_computed = 0
        seq.prefilled = False
