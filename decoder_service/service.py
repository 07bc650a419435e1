"""The decoder replica as a plain class: validation, embedding resolution, streaming.

Threads: the engine thread (see `engine.py`) runs the model; `generate` runs on
the caller's asyncio loop, resolves embeddings from the object store in a worker
thread, submits the sequence and relays its chunks from an asyncio queue. Leaving
the generator early (client gone, task cancelled) aborts the sequence, which
frees its KV blocks at the next step.

Errors: what the caller sent wrong is a `RequestError` naming the field; an
embedding that does not fit the prompt or the model is an `EmbeddingMismatchError`
(the router's or the encoder's fault, not the client's); a failure while computing
arrives as `DecoderStepError`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator

import numpy as np

from decoder_service.background_compiles import BackgroundCompiles
from decoder_service.block_manager import BlockManager
from decoder_service.config import DecoderConfig
from decoder_service.engine import DecoderStepError, Engine
from decoder_service.grammar import Grammars, GrammarState
from decoder_service.graph_times import GraphTimes
from decoder_service.runner import ModelRunner
from decoder_service.scheduler import Scheduler
from decoder_service.sequence import Sequence, image_spans
from runtime.checkpoint import open_checkpoint
from runtime.chunk_step_gate import ChunkStepGate
from runtime.device import open_device
from runtime.embedding_dtype import EMBEDDING_DTYPES, to_float32
from runtime.geometry import geometry_of, tokens_per_image
from runtime.host_cpu import HostCpu
from runtime.messages import (
    EmbeddingMismatchError,
    GenerateChunk,
    GenerateRequest,
    RequestError,
    SamplingParams,
)
from runtime.graphs import WarmupProgress
from runtime.object_store import ObjectStore

log = logging.getLogger(__name__)

EMBEDDING_GET_TIMEOUT_S = 30.0


class DecoderService:
    def __init__(self, config: DecoderConfig, store: ObjectStore,
                 warmup_progress: WarmupProgress | None = None) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.store = store
        checkpoint = open_checkpoint(config.model)
        self.model_id = checkpoint.model_id
        self.model_path = str(checkpoint.path)
        self.image_token_id = geometry_of(checkpoint.config).image_token_id
        self.tokens_per_image = tokens_per_image(checkpoint)  # for the deploy's consistency check
        device = open_device(config.device)
        self.runner = ModelRunner(config, checkpoint, device)
        self.shapes = self.runner.shapes
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint.path)
        eos = checkpoint.config.text_config.eos_token_id
        eos = self.tokenizer.eos_token_id if eos is None else eos
        self.eos_token_id = int(eos[0] if isinstance(eos, (list, tuple)) else eos)
        self.grammars = Grammars(self.tokenizer, self.runner.vocab_size, self.eos_token_id)
        self.runner.warm_up(full=config.full_warmup, progress=warmup_progress)
        blocks = BlockManager(self.shapes.num_blocks, self.shapes.block_size,
                              config.enable_prefix_caching)
        scheduler = Scheduler(self.shapes, blocks, config.chunk_tokens_while_decoding)
        host = HostCpu()  # background compiles yield to it; on a CPU device, steps watch it
        self.engine = Engine(self.runner, scheduler, self.tokenizer, self.eos_token_id,
                             compiles=BackgroundCompiles(
                                 self.runner, share=config.background_compile_share, host_cpu=host),
                             graph_times=GraphTimes(config.contended_slowdown, others_computing=(
                                 host.others_computing if device.computes_on_host else None)),
                             chunk_gate=ChunkStepGate() if device.computes_on_host else None)
        self.engine.start()
        self._active: set[str] = set()  # request ids being generated (touched on one event loop)

    @property
    def hidden_size(self) -> int:
        return self.runner.hidden_size

    @property
    def is_ready(self) -> bool:
        return self.runner.guard.is_warm and self.engine.is_alive

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.stop()

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        if request.request_id in self._active:
            raise RequestError(f"request_id: {request.request_id!r} is already being generated")
        self._active.add(request.request_id)
        try:
            async for chunk in self._generate(request):
                yield chunk
        finally:
            self._active.discard(request.request_id)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        seq = await self._prepare(request)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        self.engine.submit(seq, lambda item: loop.call_soon_threadsafe(chunks.put_nowait, item))
        finished = False
        try:
            while not finished:
                item = await chunks.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item if isinstance(item, DecoderStepError) else DecoderStepError(str(item))
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.engine.abort(request.request_id)

    async def _prepare(self, request: GenerateRequest) -> Sequence:
        prompt = np.asarray(request.prompt_token_ids, dtype=np.int64)
        params = request.sampling
        vocab = self.runner.vocab_size
        if prompt.ndim != 1 or len(prompt) == 0:
            raise RequestError("prompt_token_ids: must be a non-empty list of token ids")
        if prompt.min() < 0 or prompt.max() >= vocab:
            raise RequestError(f"prompt_token_ids: ids must be in [0, {vocab})")
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]),
                          ("stop_token_ids", params.stop_token_ids)):
            if any(not 0 <= t < vocab for t in ids):
                raise RequestError(f"{name}: token ids must be in [0, {vocab})")
        max_len = self.shapes.max_model_len
        if len(prompt) + params.max_tokens > max_len:
            raise RequestError(
                f"max_tokens: the prompt has {len(prompt)} tokens and max_tokens is "
                f"{params.max_tokens}; together they exceed max_model_len {max_len}")
        if len(request.images) > self.config.max_images_per_request:
            raise RequestError(f"images: at most {self.config.max_images_per_request} per request, "
                               f"got {len(request.images)}")
        placeholders = int(np.count_nonzero(prompt == self.image_token_id))
        rows = [ref.meta.num_tokens for ref in request.images]
        if placeholders != sum(rows):
            raise EmbeddingMismatchError(
                f"images: the prompt has {placeholders} image placeholder tokens but its "
                f"{len(request.images)} image(s) carry {sum(rows)} embedding rows")
        for ref in request.images:
            ref.meta.check_compatible(self.model_id, self.hidden_size)
            if ref.meta.dtype not in EMBEDDING_DTYPES:
                raise EmbeddingMismatchError(f"embedding {ref.meta.image_hash[:16]} is stored as "
                                             f"{ref.meta.dtype!r}, not one of {EMBEDDING_DTYPES}")
        image_rows = None
        if request.images:
            arrays = await asyncio.to_thread(
                self.store.get, [ref.object_ref for ref in request.images], EMBEDDING_GET_TIMEOUT_S)
            for ref, array in zip(request.images, arrays):
                if array.shape != (ref.meta.num_tokens, ref.meta.hidden_size):
                    raise EmbeddingMismatchError(
                        f"embedding {ref.meta.image_hash[:16]} has shape {array.shape}, its "
                        f"metadata says {(ref.meta.num_tokens, ref.meta.hidden_size)}")
            image_rows = np.concatenate([to_float32(array, ref.meta.dtype)
                                         for ref, array in zip(request.images, arrays)])
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        spans = image_spans(prompt, self.image_token_id, rows,
                            [ref.meta.image_hash for ref in request.images])
        grammar = await self._grammar(params)
        return Sequence(request.request_id, prompt.tolist(), params, seed, images=spans,
                        image_rows=image_rows, grammar=grammar,
                        stop_ids=(self.eos_token_id, *params.stop_token_ids))

    async def _grammar(self, params: SamplingParams) -> GrammarState | None:
        """The sequence's grammar state, compiled off the event loop."""
        if params.response_format is None:
            return None
        if params.min_tokens:  # min_tokens bans EOS, which ends a grammar: they cannot both hold
            raise RequestError("min_tokens: cannot be combined with response_format")
        return await asyncio.to_thread(self.grammars.matcher, params.response_format)
