"""The engine: continuous batching over one model runner.

Threads: `start()` launches one engine thread that loops
`schedule() -> runner.prefill/decode -> postprocess`. Any other thread (the
replica's asyncio loop) may call `submit` and `abort`; both only post a command on
a queue and wake the engine thread, which applies it between steps, so a new
request joins, and an aborted one frees its slot, at the next step boundary.
Each sequence's chunks go to its `sink` callback, called on the engine thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from decoder_service.detokenizer import IncrementalDetokenizer
from decoder_service.inputs import SeqView, build_decode, build_prefill
from decoder_service.runner import ModelRunner
from decoder_service.sampler import SampledRow, unpack
from decoder_service.scheduler import Scheduler, Sequence, SeqStatus, Step
from runtime.messages import GenerateChunk, TokenLogprob

log = logging.getLogger(__name__)

Sink = Callable[[GenerateChunk | BaseException], None]


@dataclass
class _Live:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    sink: Sink


class Engine:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, tokenizer, eos_token_id: int) -> None:
        self.runner = runner
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id
        self._live: dict[str, _Live] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = {"prefill": 0, "decode": 0}
        self.tokens_generated = 0
        self.prompt_tokens = 0

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

    def stats(self) -> dict:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "slots_in_use": self.runner.shapes.max_num_seqs - self.scheduler.num_free_slots,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.tokens_generated,
                "prefill_steps": self.steps["prefill"], "decode_steps": self.steps["decode"],
                "compilations_after_warmup": self.runner.guard.compilations_after_warmup}

    # --- engine thread ----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            if not self.step():
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
                self._live[seq.request_id] = _Live(seq, IncrementalDetokenizer(
                    self.tokenizer, seq.sampling.stop), sink)
                self.scheduler.add(seq)
            elif (live := self._live.pop(arg, None)) is not None:
                self.scheduler.finish(live.seq)
                log.info("request %s aborted after %d tokens; slot freed", arg,
                         len(live.seq.output_ids))

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to do."""
        self._drain_inbox()
        step = self.scheduler.schedule()
        if step is None:
            return False
        try:
            rows = self._run(step)
        except Exception as error:  # the step's requests fail; the engine keeps serving
            log.exception("decoder: %s step failed", step.kind)
            for seq in step.seqs:
                if (live := self._live.pop(seq.request_id, None)) is not None:
                    self.scheduler.finish(seq)
                    live.sink(error)
            return True
        self.steps[step.kind] += 1
        for seq, row in zip(step.seqs, rows):
            if seq.status is SeqStatus.RUNNING and seq.request_id in self._live:
                self._postprocess(self._live[seq.request_id], row)
        return True

    def _run(self, step: Step) -> list[SampledRow]:
        r = self.runner
        if step.kind == "prefill":
            views = [SeqView(s.slot, s.prompt_ids, 0, s.image_rows, s.sampling.temperature,
                             s.sampling.top_p, s.sampling.top_k, s.seed, 0) for s in step.seqs]
            inputs = build_prefill(views, r.shapes, image_token_id=r.image_token_id,
                                   hidden_size=r.hidden_size, vocab_size=r.vocab_size,
                                   scratch_slot=r.scratch_slot)
            self.prompt_tokens += sum(len(s.prompt_ids) for s in step.seqs)
            return unpack(r.prefill(inputs), len(views))
        views = [SeqView(s.slot, s.output_ids[-1:], s.num_tokens - 1, None, s.sampling.temperature,
                         s.sampling.top_p, s.sampling.top_k, s.seed, len(s.output_ids))
                 for s in step.seqs]
        inputs = build_decode(views, r.shapes, vocab_size=r.vocab_size, scratch_slot=r.scratch_slot)
        return unpack(r.decode(inputs), len(views))

    def _postprocess(self, live: _Live, row: SampledRow) -> None:
        seq, params = live.seq, live.seq.sampling
        token = row.token_id
        seq.output_ids.append(token)
        self.tokens_generated += 1
        finish = None
        if token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos):
            finish, text = "stop", ""
        else:
            text = live.detokenizer.add(token)
            if live.detokenizer.stopped:
                finish = "stop"
        if finish is None and (len(seq.output_ids) >= params.max_tokens
                               or seq.num_tokens >= self.runner.shapes.max_model_len):
            finish = "length"
        if finish is not None:
            text += live.detokenizer.flush()
        logprobs = None
        if params.logprobs:
            top = tuple((int(i), float(p)) for i, p in zip(row.top_ids[:params.top_logprobs],
                                                            row.top_logprobs[:params.top_logprobs]))
            logprobs = (TokenLogprob(token, row.logprob, top),)
        chunk = GenerateChunk(seq.request_id, text, (token,), logprobs, finish,
                              len(seq.prompt_ids), len(seq.output_ids))
        if finish is not None:
            del self._live[seq.request_id]
            self.scheduler.finish(seq)
            log.info("request %s finished (%s): %d prompt + %d generated tokens", seq.request_id,
                     finish, len(seq.prompt_ids), len(seq.output_ids))
        live.sink(chunk)

