"""The engine: continuous batching over one model runner.

Threads: `start()` launches one engine thread that loops `schedule() -> run ->
postprocess`. Each step runs the decode graph over every decoding sequence, hands
their tokens out, then runs the prefill graph over the step's chunks; a step with at
least half a decode batch and chunks runs both on one mixed graph, padded up, when one
is compiled that fits (`ModelRunner.mixed_graph_for`), the same tokens for one call. Any other
thread (the replica's asyncio loop) may call `submit` and `abort`; both only post
a command on a queue and wake the engine thread, which applies it between steps,
so a new request joins, and an aborted one frees its blocks, at the next step.
Each sequence's chunks go to its `sink` callback, called on the engine thread.
Each graph call is timed (`graph_times.GraphTimes`); a call well above its graph's best, or
(on a CPU host) other threads runnable on every core before a step, tells the scheduler the
cores are shared, and the step carries a smaller chunk. A step carrying a chunk beside
decodes holds `chunk_gate` (on a CPU host): an encoder beside it starts its next batch after
the step, not during it (runtime/chunk_step_gate.py). Once an encoder has announced a batch,
the scheduler may size the step for it instead (`ScheduledStep.beside_encoder`), and such a
step does not hold the gate.

Graphs that start-up left out compile on the engine thread between steps, when
`background_compiles.BackgroundCompiles` allows it (idle, or within a share of the time
under load); until the decode graph is in, decodes run on the prefill graph as one-token
chunks.

Faults stay with their requests: a graph that raises fails the sequences it held,
a post-processing or sink that raises fails its own sequence; the engine goes on
serving the rest and counts each in `stats()["step_errors"]`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass

from decoder_service.background_compiles import BackgroundCompiles
from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.graph_times import GraphTimes
from decoder_service.inputs import (
    build_decode,
    build_mixed,
    build_prefill,
    decode_need,
    decodes_as_chunks,
    fit_mixed,
    prefill_need,
)
from decoder_service.sampler import SampledRow, unpack
from decoder_service.scheduler import Chunk, Scheduler
from decoder_service.sequence import Sequence
from runtime.chunk_step_gate import ChunkStepGate
from runtime.messages import GenerateChunk, TokenLogprob

log = logging.getLogger(__name__)

Sink = Callable[[GenerateChunk | BaseException], None]
# A step's graph call: (the graph it ran, one sampled row per sequence).
Compute = Callable[[], tuple[Hashable, list[SampledRow]]]


class DecoderStepError(RuntimeError):
    """The decoder failed while computing this request (a server fault, not the client's)."""


@dataclass
class Request:
    """A submitted sequence with what turns its tokens into chunks for its caller."""

    seq: Sequence
    detokenizer: IncrementalDetokenizer
    sink: Sink


class Engine:
    def __init__(self, runner, scheduler: Scheduler, tokenizer, eos_token_id: int, *,
                 compiles: BackgroundCompiles | None = None, graph_times: GraphTimes | None = None,
                 chunk_gate: ChunkStepGate | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.runner = runner
        self.chunk_gate = chunk_gate  # held through steps carrying a chunk beside decodes
        self.compiles = compiles or BackgroundCompiles(runner)
        self.graph_times = graph_times or GraphTimes(contended_slowdown=None)
        self._clock = clock  # times graph calls
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self._requests: dict[str, Request] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # mixed: steps that decode and prefill; fused: those of them run on one mixed graph
        # "deferring": fused steps that left chunks for the next step (`_run_fused`)
        self.steps = {"prefill": 0, "decode": 0, "mixed": 0, "fused": 0, "deferring": 0}
        self.decode_steps_on_prefill = 0  # decode steps run on the prefill graph (none compiled)
        self.tokens_generated = 0
        self.prompt_tokens = 0  # prompt (and recomputed) tokens run through prefill
        self.step_errors = 0

    # --- called from any thread -------------------------------------------------------
    def submit(self, seq: Sequence, sink: Sink) -> None:
        self._inbox.put(("submit", seq, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="decoder-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self.chunk_gate is not None and not self.is_alive:  # else a step may still hold it
            self.chunk_gate.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        blocks = self.scheduler.blocks
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_used": blocks.num_used, "kv_blocks_total": blocks.num_blocks - 1,
                "kv_blocks_cached": blocks.num_cached,
                "prefix_cache_queried_tokens": blocks.queried_tokens,
                "prefix_cache_hit_tokens": blocks.hit_tokens,
                "preemptions": self.scheduler.preemptions, "step_errors": self.step_errors,
                "contended_graph_calls": self.graph_times.contended_calls,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.tokens_generated,
                "prefill_steps": self.steps["prefill"], "decode_steps": self.steps["decode"],
                "mixed_steps": self.steps["mixed"], "fused_steps": self.steps["fused"],
                "fused_steps_deferring_chunks": self.steps["deferring"],
                "decode_steps_on_prefill_graph": self.decode_steps_on_prefill,
                "graphs_compiled": self.runner.graphs_compiled,
                "graphs_planned": self.runner.graphs_planned,
                "compiles_stopped": self.runner.compiles_stopped,
                "compilations_after_warmup": self.runner.guard.compilations_after_warmup}

    # --- engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            try:
                busy = self.step()
                compiled = self.compiles.compile_one(busy)
            except Exception:  # a bug outside any one request: keep the thread, fail nobody
                self.step_errors += 1
                log.exception("decoder: engine step failed")
                busy = compiled = False
                time.sleep(0.1)
            if not busy and not compiled:
                self._wake.wait(timeout=1.0)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, arg, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "submit":
                seq: Sequence = arg
                if seq.request_id in self._requests:
                    self._deliver(sink, DecoderStepError(
                        f"request id {seq.request_id!r} is already running in this decoder"))
                    continue
                decode = seq.grammar.decode if seq.grammar is not None else None
                self._requests[seq.request_id] = Request(
                    seq, IncrementalDetokenizer(self.tokenizer, seq.sampling.stop, decode=decode), sink)
                self.scheduler.add(seq)
            elif (request := self._requests.pop(arg, None)) is not None:
                self.scheduler.finish(request.seq)
                log.info("request %s aborted after %d tokens; blocks freed", arg,
                         len(request.seq.output_ids))

    def step(self) -> bool:
        """One engine step; False when there was nothing to do."""
        self._drain_inbox()
        gate = self.chunk_gate
        step = self.scheduler.schedule(contended=self.graph_times.contended,
                                       encoder_busy=gate is not None and gate.encoder_busy())
        if step is None:
            return False
        mixed = bool(step.decodes and step.chunks)
        with gate.chunk_step() if mixed and gate and not step.beside_encoder else nullcontext():
            if not (mixed and self._run_fused(step.decodes, step.chunks)):
                if step.decodes:
                    self._run_decodes(step.decodes)
                if step.chunks:
                    self._run_chunks(step.chunks)
        self.steps["mixed"] += mixed
        return True

    def _run_fused(self, seqs: list[Sequence], chunks: list[Chunk]) -> bool:
        """Runs a step's decodes and chunks on one mixed graph, leaving for the next step the
        chunks no compiled graph has room for (`inputs.fit_mixed`); False (nothing run) when
        no compiled one fits even part of them."""
        r = self.runner
        fitted = None
        if r.can_decode:
            fitted = fit_mixed(seqs, chunks, r.shapes, lambda need: r.mixed_graph_for(len(seqs), need))
        if fitted is None:
            return False
        graph, carried = fitted
        self.steps["deferring"] += carried != chunks
        chunks = carried
        self.prompt_tokens += sum(c.num_tokens for c in chunks)

        def compute() -> tuple[Hashable, list[SampledRow]]:
            inputs = build_mixed(seqs, chunks, r.shapes, graph=graph, hidden_size=r.hidden_size,
                                 vocab_size=r.vocab_size)
            decoded, prefilled = r.mixed(inputs)
            return ("mixed", graph), unpack(decoded, len(seqs)) + unpack(prefilled, len(chunks))
        self._run("fused", [*seqs, *(c.seq for c in chunks)], compute,
                  [*(s.num_tokens for s in seqs), *(c.end for c in chunks)],
                  sampled=[*(True for _ in seqs), *(c.completes for c in chunks)])
        return True

    def _run_decodes(self, seqs: list[Sequence]) -> None:
        r = self.runner
        if not r.can_decode:
            with self.compiles.decoding_on_prefill_graph():
                for group in decodes_as_chunks(seqs, r.shapes, r.plans["prefill"].covering):
                    self._run("decode", [c.seq for c in group], self._prefill_compute(group),
                              [c.end for c in group])
                    self.decode_steps_on_prefill += 1
            return

        def compute() -> tuple[Hashable, list[SampledRow]]:
            graph = r.graph_for("decode", decode_need(seqs, r.shapes))
            inputs = build_decode(seqs, r.shapes, graph=graph, vocab_size=r.vocab_size)
            return ("decode", graph), unpack(r.decode(inputs), len(seqs))
        self._run("decode", seqs, compute, [s.num_tokens for s in seqs])

    def _run_chunks(self, chunks: list[Chunk]) -> None:
        self.prompt_tokens += sum(c.num_tokens for c in chunks)
        self._run("prefill", [c.seq for c in chunks], self._prefill_compute(chunks),
                  [c.end for c in chunks], sampled=[c.completes for c in chunks])

    def _prefill_compute(self, chunks: list[Chunk]) -> Compute:
        r = self.runner

        def compute() -> tuple[Hashable, list[SampledRow]]:
            graph = r.graph_for("prefill", prefill_need(chunks, r.shapes))
            inputs = build_prefill(chunks, r.shapes, graph=graph, hidden_size=r.hidden_size,
                                   vocab_size=r.vocab_size)
            return ("prefill", graph), unpack(r.prefill(inputs), len(chunks))
        return compute

    def _run(self, kind: str, seqs: list[Sequence], compute: Compute,
             computed: list[int], sampled: list[bool] | None = None) -> None:
        try:
            started = self._clock()
            graph, rows = compute()
            self.graph_times.record(graph, self._clock() - started)
        except Exception as error:  # the graph's sequences fail; the engine keeps serving
            log.exception("decoder: %s graph failed", kind)
            for seq in seqs:
                self._fail(seq, error)
            return
        self.steps[kind] += 1
        for i, (seq, row) in enumerate(zip(seqs, rows)):
            request = self._requests.get(seq.request_id)
            if request is None or request.seq is not seq:
                continue  # defensive: aborts and failures apply between steps, not within one
            try:
                self.scheduler.advance(seq, computed[i])
                if sampled is None or sampled[i]:
                    seq.prefilled = True
                    self._postprocess(request, row)
            except Exception as error:  # noqa: BLE001: only this request fails
                log.exception("decoder: post-processing request %s failed", seq.request_id)
                self._fail(seq, error)

    def _fail(self, seq: Sequence, error: BaseException) -> None:
        self.step_errors += 1
        request = self._requests.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        if request is not None:
            self._deliver(request.sink, DecoderStepError(
                f"request {seq.request_id} failed in the decoder: {type(error).__name__}: {error}"))

    @staticmethod
    def _deliver(sink: Sink, item) -> None:
        try:
            sink(item)
        except Exception:  # noqa: BLE001: the caller's side is gone; nothing left to tell
            log.exception("decoder: a sink raised while being told of a failure")

    def _postprocess(self, request: Request, row: SampledRow) -> None:
        seq, params = request.seq, request.seq.sampling
        token = row.token_id
        seq.output_ids.append(token)
        self.tokens_generated += 1
        finish = None
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos):
            finish, text = "stop", ""
        elif seq.grammar is not None and seq.grammar.is_terminated:  # its stop token was taken
            finish, text = "stop", ""
        else:
            text = request.detokenizer.add(token)
            if request.detokenizer.stopped:
                finish = "stop"
        if finish is None and (len(seq.output_ids) >= params.max_tokens
                               or seq.num_tokens >= self.runner.shapes.max_model_len):
            finish = "length"
        if finish is not None:
            text += request.detokenizer.flush()
        logprobs = None
        if params.logprobs:
            k = params.top_logprobs
            top = tuple((int(i), float(p)) for i, p in zip(row.top_ids[:k], row.top_logprobs[:k])
                        if p > float("-inf"))  # tokens a grammar or bias ruled out are not listed
            logprobs = (TokenLogprob(token, row.logprob, top),)
        chunk = GenerateChunk(seq.request_id, text, (token,), logprobs, finish,
                              len(seq.prompt_ids), len(seq.output_ids))
        if finish is not None:
            del self._requests[seq.request_id]
            self.scheduler.finish(seq)
            log.info("request %s finished (%s): %d prompt + %d generated tokens", seq.request_id,
                     finish, len(seq.prompt_ids), len(seq.output_ids))
        request.sink(chunk)
