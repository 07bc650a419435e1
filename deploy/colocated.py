"""The colocated layout: one replica holds both halves (for comparison with the
disaggregated default). It answers the encoder's and the decoder's calls, so the
router is the same; embeddings still go through Ray's object store, which is
zero-copy within a process."""

from __future__ import annotations

from collections.abc import AsyncIterator

from ray import serve

from decoder_service.config import DecoderConfig
from deploy.decoder import decoder_info
from deploy.metrics import DECODER_SERIES, ENCODER_SERIES, StatsExporter
from encoder_service.config import EncoderConfig
from runtime.messages import EmbeddingRef, GenerateChunk, GenerateRequest, ItemError
from deploy.warmup_progress import for_this_replica
from runtime.cpu_priority import restore_compute_policy
from runtime.lean_imports import defer_unused_imports
from runtime.compile_cache import enable_persistent_cache, record_smoke_check_in_background
from runtime.object_store import RayObjectStore


class ColocatedServer:
    def __init__(self, encoder: EncoderConfig, decoder: DecoderConfig,
                 compile_cache: str | None = None) -> None:
        restore_compute_policy()  # before it starts threads of its own (runtime/cpu_priority.py)
        defer_unused_imports()  # before torch_xla and transformers (runtime/lean_imports.py)
        # Once per process, before anything compiles: both halves share the process's cache.
        cache = enable_persistent_cache(compile_cache, "colocated", device_kind=decoder.device,
                                        defer_check=True)
        from decoder_service.service import DecoderService  # torch: in the replica, not the driver
        from encoder_service.service import EncoderService

        store = RayObjectStore()
        progress = {half: for_this_replica(half) for half in ("encoder", "decoder")}
        try:
            self.encoder = EncoderService(encoder, store, warmup_progress=progress["encoder"])
            self.decoder = DecoderService(decoder, store, warmup_progress=progress["decoder"])
        finally:
            for publisher in progress.values():
                publisher.done()
        if cache.check_pending:
            record_smoke_check_in_background(compile_cache)
        self._metrics = StatsExporter("colocated", self.stats, ENCODER_SERIES + DECODER_SERIES, buckets=True)

    async def encode(self, images: list[bytes], request_id: str | None = None, *,
                     refresh: bool = False, route_key: str | None = None) -> list[EmbeddingRef | ItemError]:
        """`route_key` was read by the request router (deploy/affinity.py); the replica ignores it."""
        return await self.encoder.encode(images, request_id, refresh=refresh)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]:
        async for chunk in self.decoder.generate(request):
            yield chunk

    def info(self) -> dict:
        return {**decoder_info(self.decoder), "fingerprint": self.encoder.fingerprint}

    def stats(self) -> dict:
        encoder, decoder = self.encoder.stats(), self.decoder.stats()
        both = ("compilations_after_warmup", "graphs_compiled", "graphs_planned")
        return {**encoder, **decoder, **{key: encoder.get(key, 0) + decoder.get(key, 0) for key in both}}

    def check_health(self) -> None:
        if not (self.encoder.is_ready and self.decoder.is_ready):
            raise RuntimeError("colocated replica is not ready")

    def __del__(self) -> None:
        for service in (getattr(self, "encoder", None), getattr(self, "decoder", None)):
            if service is not None:
                (getattr(service, "close", None) or service.shutdown)()


ColocatedDeployment = serve.deployment(name="colocated", max_ongoing_requests=128)(ColocatedServer)
