"""Serve wiring of the decoder: a thin deployment around `DecoderService`.

The replica compiles every bucket in its constructor, so Serve routes to it only
once it is warm. The app builder (`deploy/app.py`) sets replicas, resources and
autoscaling through `.options(...)`.

Draining: a replica that a redeploy or a scale-down retires stops getting new
requests at once, and Serve waits (polling every `graceful_shutdown_wait_loop_s`)
until its streams have finished, up to `graceful_shutdown_timeout_s`, before it
stops the engine and kills the process. Serve's default of 20 s would cut long
generations short; `DRAIN_OPTIONS` gives them minutes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from ray import serve

from decoder_service.config import DecoderConfig
from deploy.autoscaling import TOKENS_IN_FLIGHT
from deploy.metrics import DECODER_SERIES, StatsExporter, hit_rate
from deploy.warmup_progress import for_this_replica
from runtime.cpu_priority import restore_compute_policy
from runtime.lean_imports import defer_unused_imports
from runtime.compile_cache import enable_persistent_cache, record_smoke_check_in_background
from runtime.messages import GenerateChunk, GenerateRequest
from runtime.object_store import RayObjectStore

if TYPE_CHECKING:
    from decoder_service.service import DecoderService


def decoder_info(service: DecoderService) -> dict:
    return {"model_id": service.model_id, "model_path": service.model_path,
            "hidden_size": service.hidden_size, "max_model_len": service.shapes.max_model_len,
            "tokens_per_image": service.tokens_per_image,
            "max_images": service.config.max_images_per_request}


class DecoderServer:
    def __init__(self, config: DecoderConfig, compile_cache: str | None = None) -> None:
        restore_compute_policy()  # before it starts threads of its own (runtime/cpu_priority.py)
        defer_unused_imports()  # before torch_xla and transformers (runtime/lean_imports.py)
        cache = enable_persistent_cache(compile_cache, "decoder", device_kind=config.device,
                                        defer_check=True)  # first: before anything compiles
        from decoder_service.service import DecoderService  # torch: in the replica, not the driver

        progress = for_this_replica("decoder")  # for `splitserve serve` to show while it compiles
        try:
            self.service = DecoderService(config, RayObjectStore(), warmup_progress=progress)
        finally:
            progress.done()
        if cache.check_pending:
            record_smoke_check_in_background(compile_cache)
        self._tokens_in_flight = 0  # output tokens still owed to the requests in this replica
        self._metrics = StatsExporter("decoder", self.stats, DECODER_SERIES)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        """Streams chunks; call through `handle.options(stream=True)`. Cancelling the call
        aborts the sequence and frees its slot."""
        owed = request.sampling.max_tokens
        self._tokens_in_flight += owed
        try:
            async for chunk in self.service.generate(request):
                paid = min(len(chunk.token_ids), owed)
                owed -= paid
                self._tokens_in_flight -= paid
                yield chunk
        finally:
            self._tokens_in_flight -= owed

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metric (deploy/autoscaling.py): the decoder scales on tokens."""
        return {TOKENS_IN_FLIGHT: self._tokens_in_flight}

    def info(self) -> dict:
        return decoder_info(self.service)

    def stats(self) -> dict:
        stats = self.service.stats()
        return {**stats, "prefix_cache_hit_rate": hit_rate(stats["prefix_cache_hit_tokens"],
                                                           stats["prefix_cache_queried_tokens"])}

    def check_health(self) -> None:
        if not self.service.is_ready:
            raise RuntimeError("decoder warm-up has not finished")
        # A dead engine thread would leave every request waiting forever: fail the check so
        # Serve replaces the replica (its callers then get a 503).
        if not self.service.engine.is_alive:
            raise RuntimeError("the decoder engine thread has stopped")

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.shutdown()


# How a retiring replica drains (router and colocated replicas relay the same streams).
DRAIN_OPTIONS = {"graceful_shutdown_timeout_s": 300.0, "graceful_shutdown_wait_loop_s": 1.0}

# Requests beyond the KV pool or max_num_seqs wait in the engine's queue, so accept plenty.
DecoderDeployment = serve.deployment(name="decoder", max_ongoing_requests=128,
                                     **DRAIN_OPTIONS)(DecoderServer)
