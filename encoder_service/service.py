"""The encoder service: image bytes in, embedding references out.

`EncoderService(config, store)` loads the checkpoint's vision half, compiles the
largest item-batch bucket (every batch fits it; the others compile while the batcher
is idle, or all up front with `full_warmup`), and is ready when the constructor
returns (`is_ready`); `close()` stops it. Each image of `encode(...)` goes:

    key (hash of bytes) -> cache hit: the cached EmbeddingRef, nothing else runs
                        -> in flight for another request: wait for that one
                        -> miss: preprocess (pool) -> batcher -> device -> store.put -> cache

A LLaVA-NeXT image is several batcher items (its base view and grid tiles,
`encoder_service.anyres`); when the last of them is done, its tiles are packed on the host
into one [num_tokens, hidden] embedding whose row count depends on the image's shape.

Threads: `encode` runs on the caller's event loop (any loop) and only waits; the
"encoder-preprocess" pool decodes and preprocesses misses; the batcher's worker thread
runs every device step and then puts each result in the object store. The batcher counts the
misses still in the pool as on their way (`incoming`), so a burst of new images becomes one
batch even when their preprocessing ends tens of milliseconds apart. A miss's
computation is chained by future callbacks, not owned by the request that started it,
so a cancelled request never strands the requests that joined its image.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from contextlib import nullcontext

from encoder_service.anyres import AnyresLayout, TilePreprocessor, pack
from encoder_service.batcher import Batcher
from encoder_service.cache import EmbeddingCache
from encoder_service.config import EncoderConfig
from encoder_service.preprocess import ImageRejected, Preprocessor, load_image_processor
from encoder_service.runner import EncoderRunner
from encoder_service.vision_model import load_vision_encoder
from runtime.checkpoint import open_checkpoint
from runtime.chunk_step_gate import ChunkStepGate
from runtime.compile_guard import CompileGuard
from runtime.device import open_device
from runtime.host_cpu import HostCpu
from runtime.embedding_dtype import to_stored
from runtime.image_key import image_cache_key, preprocess_fingerprint
from runtime.messages import EmbeddingMeta, EmbeddingRef, ItemError
from runtime.graphs import WarmupProgress
from runtime.object_store import ObjectStore

log = logging.getLogger(__name__)


class EncoderService:
    def __init__(self, config: EncoderConfig, store: ObjectStore,
                 warmup_progress: WarmupProgress | None = None) -> None:
        started = time.perf_counter()
        self.config = config
        self._store = store
        checkpoint = open_checkpoint(config.model)
        self.model_id = checkpoint.model_id
        device = open_device(config.device)
        model = load_vision_encoder(checkpoint)
        self.hidden_size = model.hidden_size
        self.tokens_per_image = model.tokens_per_image  # per view; per tile for LLaVA-NeXT
        self.anyres = AnyresLayout.of(checkpoint.config) if checkpoint.is_anyres else None
        self._image_newline = model.image_newline
        image_processor = load_image_processor(checkpoint.path)
        # The processor's whole config, grid pinpoints included, is part of every image key.
        self.fingerprint = preprocess_fingerprint(image_processor)
        self._preprocessor = (TilePreprocessor if self.anyres else Preprocessor)(
            image_processor, model.image_size, max_image_bytes=config.max_image_bytes,
            max_image_pixels=config.max_image_pixels)
        guard = CompileGuard(device, strict=config.strict_compile, name="encoder")
        self._runner = EncoderRunner(model, device, config.buckets, guard)
        self._runner.warm_up(full=config.full_warmup, progress=warmup_progress)
        self._host_cpu = HostCpu()
        # A LocalObjectStore frees an array only when told; Ray frees it with its last ref.
        drop = getattr(store, "drop", None)
        self._cache = EmbeddingCache(config.encoder_cache_bytes,
                                     on_evict=(lambda ref: drop(ref.object_ref)) if drop else None)
        self._pool = ThreadPoolExecutor(config.preprocess_threads, thread_name_prefix="encoder-preprocess")
        # On a CPU host a batch starts between the decoder's chunk-carrying steps.
        self._gate = ChunkStepGate() if device.computes_on_host else None
        self._preprocessing = 0  # misses between `_compute` and the batcher (the pool's threads)
        self._preprocessing_lock = threading.Lock()
        self._batcher = Batcher(self._run_batch, max_items=config.max_batch_items,
                                wait_s=config.batch_wait_s, max_wait_s=config.batch_max_wait_s,
                                name="encoder", on_idle=self._compile_when_host_spares,
                                incoming=lambda: self._preprocessing)
        self._item_errors = 0
        self.startup_seconds = time.perf_counter() - started
        log.info("encoder: %s ready in %.1f s (%d tokens x %d per image)", self.model_id,
                 self.startup_seconds, self.tokens_per_image, self.hidden_size)

    @property
    def is_ready(self) -> bool:
        return self._batcher.is_alive

    def _run_batch(self, pixels: list) -> list:
        with self._gate.encoding() if self._gate else nullcontext():
            return self._runner.run(pixels)

    def _compile_when_host_spares(self) -> bool:
        """The batcher's idle work: one more bucket, unless the host's CPUs are busy (replicas
        beside this one may still be warming up; `runtime.host_cpu`). Once every bucket is in,
        the batcher stops asking."""
        if self._runner.plan.next_pending() is None:
            # The batcher's thread asks from its start: before the constructor has stored it.
            batcher = getattr(self, "_batcher", None)
            if batcher is not None:
                batcher.retire_idle_work()
            return False
        return self._host_cpu.has_spare() and self._runner.compile_next()

    def image_key(self, data: bytes) -> str:
        return image_cache_key(data, self.model_id, self.fingerprint)

    async def encode(self, images: list[bytes], request_id: str | None = None, *,
                     refresh: bool = False, route_key: str | None = None) -> list[EmbeddingRef | ItemError]:
        """One result per image, in order: its EmbeddingRef, or an ItemError naming it.

        `refresh`: the caller found these images' embeddings gone from the object store;
        their cache entries are dropped first, so they are computed again. `route_key` is the
        `EncoderClient` protocol's hint for a request router in front of replicas; a service
        called directly has nothing to route and ignores it."""
        if not self.is_ready:
            raise RuntimeError("the encoder service is closed")
        keys = await asyncio.to_thread(self._keys, images)
        waits: list[EmbeddingRef | ImageRejected | Future] = []
        for data, key in zip(images, keys):  # no await in this loop: claims are made together
            if isinstance(key, ImageRejected):
                waits.append(key)
                continue
            if refresh:
                self._cache.forget(key)
            claim = self._cache.claim(key)
            if claim.owner:
                self._compute(key, data)
            waits.append(claim.ref if claim.ref is not None else claim.future)
        results: list[EmbeddingRef | ItemError] = []
        for index, wait in enumerate(waits):
            try:
                if isinstance(wait, ImageRejected):
                    raise wait
                if isinstance(wait, Future):
                    # shield: a cancelled request must not cancel a computation others joined
                    wait = await asyncio.shield(asyncio.wrap_future(wait))
                results.append(wait)
            except ImageRejected as error:
                results.append(self._item_error(index, request_id, str(error), retryable=False))
            except Exception as error:  # a failed device step or store put: this item only
                log.error("encoder: image %d of request %s failed: %r", index, request_id, error)
                results.append(self._item_error(index, request_id, f"encoding failed ({error})",
                                                retryable=True))
        return results

    def stats(self) -> dict:
        return {**self._cache.stats(), **self._runner.stats(), "item_errors": self._item_errors,
                "batches": self._batcher.batches, "batched_items": self._batcher.items,
                "waited_for_chunk_steps_s": self._gate.waited_s if self._gate else 0.0}

    def close(self) -> None:
        self._batcher.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._gate is not None and self._batcher.worker_ended:  # else a batch may still wait on it
            self._gate.close()

    def _keys(self, images: list[bytes]) -> list[str | ImageRejected]:
        """Cache keys, or why an image is refused before it is even hashed (type, size)."""
        keys: list[str | ImageRejected] = []
        for data in images:
            try:
                self._preprocessor.check_bytes(data)
                keys.append(self.image_key(data))
            except ImageRejected as error:
                keys.append(error)
        return keys

    def _compute(self, key: str, data: bytes) -> None:
        """Starts the miss for `key`: preprocess (pool) -> batcher -> store; ends it in the cache."""

        def fail(error: BaseException) -> None:
            if isinstance(error, CancelledError):  # asyncio would read it as the waiter's cancel
                error = RuntimeError("the encoder shut down before this image ran")
            self._cache.fail(key, error)

        def on_pixels(done: Future) -> None:
            try:
                pixels = done.result()
                if self.anyres is None:
                    self._batcher.submit(pixels).add_done_callback(on_embedding)
                    return
                tiles = [self._batcher.submit(tile) for tile in pixels.pixels]  # one item each
                _when_all(tiles, lambda: on_tiles(tiles, pixels.image_size))
            except BaseException as error:
                fail(error)
            finally:  # submitted (or failed): a gathering batch stops waiting for it
                self._count_preprocessing(-1)

        def on_tiles(tiles: list[Future], image_size: tuple[int, int]) -> None:
            packed: Future = Future()
            try:
                features = [tile.result() for tile in tiles]  # num_tiles x [T, hidden]
                packed.set_result(pack(self.anyres, features, self._image_newline, image_size))
            except BaseException as error:
                packed.set_exception(error)
            on_embedding(packed)

        def on_embedding(done: Future) -> None:
            try:
                # [num_tokens, hidden_size] float32, stored in the decoder's dtype
                array = to_stored(done.result(), self.config.embedding_dtype)
                ref = EmbeddingRef(meta=self._meta(key, len(array)), object_ref=self._store.put(array))
            except BaseException as error:
                fail(error)
                return
            self._cache.fulfil(key, ref, array.nbytes)

        self._count_preprocessing(+1)
        try:
            self._pool.submit(self._preprocessor, data).add_done_callback(on_pixels)
        except RuntimeError as error:  # the pool is shut down
            self._count_preprocessing(-1)
            fail(error)

    def _count_preprocessing(self, change: int) -> None:
        with self._preprocessing_lock:
            self._preprocessing += change

    def _meta(self, key: str, num_tokens: int) -> EmbeddingMeta:
        return EmbeddingMeta(image_hash=key, num_tokens=num_tokens,
                             hidden_size=self.hidden_size, dtype=self.config.embedding_dtype,
                             model_id=self.model_id)

    def _item_error(self, index: int, request_id: str | None, reason: str, *,
                    retryable: bool) -> ItemError:
        """Bad input is final; a failure of the service itself may pass on another try."""
        self._item_errors += 1
        where = f"image {index}" + (f" of request {request_id}" if request_id else "")
        return ItemError(index=index, message=f"{where}: {reason}", retryable=retryable)


def _when_all(futures: list[Future], callback) -> None:
    """Calls `callback()` once, on the thread that finishes the last of `futures` (the batcher's
    worker, or this one if they were all done already)."""
    remaining = [len(futures)]
    lock = threading.Lock()

    def one_done(_: Future) -> None:
        with lock:
            remaining[0] -= 1
            last = remaining[0] == 0
        if last:
            callback()

    for future in futures:
        future.add_done_callback(one_done)
